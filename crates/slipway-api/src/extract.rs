//! Path and query extractors whose rejections go through the error table (axum's own answer
//! with plain text). Use these instead of `axum::extract::{Path, Query}` in handlers.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

/// Like [`Path`]; a path that does not parse is `not_found` (it names nothing that exists).
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}

/// Like [`Query`]; a query string that does not parse is `invalid_request` naming the
/// parameter.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::with_message(
                ErrorCode::InvalidRequest,
                format!(
                    "invalid query string: {}",
                    rejection
                        .body_text()
                        .trim_start_matches("Failed to deserialize query string: ")
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt;
    use serde::Deserialize;
    use tower::ServiceExt;

    use super::*;

    #[derive(Deserialize)]
    struct Tail {
        tail: Option<u64>,
    }

    async fn handler(ApiPath(n): ApiPath<u32>, ApiQuery(q): ApiQuery<Tail>) -> String {
        format!("{n} {:?}", q.tail)
    }

    async fn call(uri: &str) -> (StatusCode, String) {
        let app = Router::new().route("/x/{n}", get(handler));
        let resp = app
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn rejections_are_json_from_the_table() {
        assert_eq!(
            call("/x/5?tail=3").await,
            (StatusCode::OK, "5 Some(3)".into())
        );
        let (status, body) = call("/x/5?tail=abc").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "invalid_request");
        assert!(v["message"].as_str().unwrap().contains("tail"), "{body}");
        let (status, body) = call("/x/not-a-number").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("\"not_found\""), "{body}");
    }
}
