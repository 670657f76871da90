//! JSON request bodies: content type, size limit and parse errors, all mapped into the error
//! table with a message that names the problem (and the field, when there is one).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorCode};

/// True for `application/json` and `application/<something>+json`, with any parameters.
fn is_json_content_type(req: &Request) -> bool {
    let Some(value) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    if !is_json_content_type(&req) {
        return Err(ErrorCode::UnsupportedMediaType.into());
    }
    Ok(Bytes::from_request(req, state).await?)
}

fn syntax_error(err: &serde_json::Error) -> ApiError {
    ApiError::with_message(
        ErrorCode::InvalidJson,
        format!("the request body is not valid JSON: {err}"),
    )
}

/// A JSON body deserialized into `T`. A body that is not JSON is `invalid_json` (400); JSON of
/// the wrong shape is `invalid_request` (422) with the path of the offending field.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_data() {
                let message = if path == "." {
                    inner.to_string()
                } else {
                    format!("{path}: {inner}")
                };
                ApiError::with_message(ErrorCode::InvalidRequest, message)
            } else {
                syntax_error(&inner)
            }
        })?;
        de.end().map_err(|e| syntax_error(&e))?;
        Ok(ApiJson(value))
    }
}

/// A JSON object body, for routes that check field types one by one to name each field in
/// their own words.
#[derive(Debug, Clone)]
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::with_message(
                ErrorCode::InvalidJson,
                "the request body must be a JSON object",
            )),
            Err(err) => Err(syntax_error(&err)),
        }
    }
}
