//! Tokens and the one place that decides who may touch what.
//!
//! - A token is `slw_op_` (operator) or `slw_ag_` (agent) followed by 64 hex characters
//!   (32 random bytes). Only its sha256 is stored.
//! - [`Caller`] authenticates a request (401 otherwise); [`Operator`] also requires an operator
//!   token (403 otherwise); [`AgentAccess`] resolves the `{id}` path parameter and answers the
//!   same 404 for an agent that does not exist, a malformed id, and another agent's id, so a
//!   token never learns which agents exist.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::header;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use slipway_core::IdKind;
use slipway_store::{Agent, TokenKind, TokenRecord};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

pub const OPERATOR_TOKEN_PREFIX: &str = "slw_op_";
pub const AGENT_TOKEN_PREFIX: &str = "slw_ag_";
const SECRET_HEX_LEN: usize = 64;

fn prefix(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Operator => OPERATOR_TOKEN_PREFIX,
        TokenKind::Agent => AGENT_TOKEN_PREFIX,
    }
}

/// A freshly minted token: the secret, shown once, and the record to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub secret: String,
    pub record: TokenRecord,
}

/// Mints a token of `kind` (an agent token names its agent).
pub fn mint_token(kind: TokenKind, agent_id: Option<String>, now: i64) -> NewToken {
    let random: [u8; 32] = rand::random();
    let secret = format!("{}{}", prefix(kind), hex::encode(random));
    let record = TokenRecord {
        id: new_id(IdKind::Token),
        kind,
        agent_id,
        token_hash: hash_token(&secret),
        created_at: now,
        revoked_at: None,
    };
    NewToken { secret, record }
}

/// A new random id of `kind`.
pub fn new_id(kind: IdKind) -> String {
    kind.make(rand::random())
}

/// Lower-case hex sha256 of a token secret, as stored.
pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// True when `secret` has the shape of a slipway token; anything else is refused before the
/// store is asked.
pub fn is_well_formed(secret: &str) -> bool {
    let rest = secret
        .strip_prefix(OPERATOR_TOKEN_PREFIX)
        .or_else(|| secret.strip_prefix(AGENT_TOKEN_PREFIX));
    rest.is_some_and(|r| {
        r.len() == SECRET_HEX_LEN
            && r.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whom an authenticated request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator,
    Agent(String),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub principal: Principal,
}

impl Caller {
    pub fn is_operator(&self) -> bool {
        self.principal == Principal::Operator
    }

    pub fn agent_id(&self) -> Option<&str> {
        match &self.principal {
            Principal::Operator => None,
            Principal::Agent(id) => Some(id),
        }
    }

    /// Whether this caller may act on `agent_id`'s resources.
    pub fn may_access(&self, agent_id: &str) -> bool {
        match &self.principal {
            Principal::Operator => true,
            Principal::Agent(own) => own == agent_id,
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(ErrorCode::Unauthorized)?;
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    Ok(token.trim())
}

fn malformed() -> ApiError {
    ApiError::with_message(
        ErrorCode::Unauthorized,
        "the Authorization header must be `Bearer <token>`",
    )
}

fn invalid_token() -> ApiError {
    ApiError::with_message(
        ErrorCode::Unauthorized,
        "the API token is invalid or has been revoked",
    )
}

async fn authenticate(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
    let secret = bearer(parts)?;
    if !is_well_formed(secret) {
        return Err(invalid_token());
    }
    let hash = hash_token(secret);
    let lookup = hash.clone();
    let record = state
        .store(move |s| s.find_token_by_hash(&lookup))
        .await?
        .ok_or_else(invalid_token)?;
    // The lookup already matched, but the comparison that decides is done in constant time so
    // that a store matching loosely (e.g. by prefix index) cannot become a timing oracle.
    if !bool::from(record.token_hash.as_bytes().ct_eq(hash.as_bytes()))
        || record.revoked_at.is_some()
    {
        return Err(invalid_token());
    }
    let principal = match (record.kind, record.agent_id) {
        (TokenKind::Operator, _) => Principal::Operator,
        (TokenKind::Agent, Some(agent_id)) => Principal::Agent(agent_id),
        (TokenKind::Agent, None) => {
            return Err(ApiError::internal(format!(
                "agent token {} has no agent",
                record.id
            )))
        }
    };
    Ok(Caller {
        token_id: record.id,
        principal,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Several extractors of one handler need the caller; authenticate once per request.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let caller = authenticate(parts, state).await?;
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

/// A caller holding an operator token.
#[derive(Debug, Clone)]
pub struct Operator(pub Caller);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.is_operator() {
            return Err(ErrorCode::Forbidden.into());
        }
        Ok(Operator(caller))
    }
}

/// The agent named by the `{id}` path parameter, checked against the caller. Every route under
/// `/api/agents/{id}/` takes this extractor, so access is decided here and nowhere else.
#[derive(Debug, Clone)]
pub struct AgentAccess {
    pub agent: Agent,
    pub caller: Caller,
}

impl AgentAccess {
    pub fn agent_id(&self) -> &str {
        &self.agent.id
    }
}

impl FromRequestParts<AppState> for AgentAccess {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ErrorCode::AgentNotFound)?;
        let id = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, value)| value.to_string())
            .ok_or_else(|| {
                ApiError::internal("AgentAccess used on a route without an {id} parameter")
            })?;
        if !IdKind::Agent.is_valid(&id) || !caller.may_access(&id) {
            return Err(ErrorCode::AgentNotFound.into());
        }
        let agent = state
            .store(move |s| s.get_agent(&id))
            .await?
            .ok_or(ErrorCode::AgentNotFound)?;
        Ok(AgentAccess { agent, caller })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_well_formed_and_hashed() {
        let t = mint_token(TokenKind::Operator, None, 1);
        assert!(t.secret.starts_with(OPERATOR_TOKEN_PREFIX));
        assert!(is_well_formed(&t.secret));
        assert_eq!(t.record.token_hash, hash_token(&t.secret));
        assert_ne!(t.record.token_hash, t.secret);
        let a = mint_token(TokenKind::Agent, Some("agt-x".into()), 1);
        assert!(a.secret.starts_with(AGENT_TOKEN_PREFIX));
        assert_ne!(a.secret, mint_token(TokenKind::Agent, None, 1).secret);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let t = mint_token(TokenKind::Agent, None, 1).secret;
        assert!(!is_well_formed(&t[..t.len() - 1]));
        assert!(!is_well_formed(&format!("{t}0")));
        assert!(!is_well_formed(&t.replace("slw_ag_", "slw_xx_")));
        assert!(!is_well_formed(&t.to_uppercase()));
        assert!(!is_well_formed(""));
    }
}
