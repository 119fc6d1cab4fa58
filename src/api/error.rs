//! The API's errors: a status and a JSON body `{"error": MESSAGE, "field":
//! KEY}` naming the request field at fault (or null) and what is allowed.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::config::ConfigError;
use crate::monitor::{AddError, VmError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
    pub fn bad(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Some(field), message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, message)
    }
}

impl From<ConfigError> for ApiError {
    /// A request body that the config parser refused: 400, the key named.
    fn from(e: ConfigError) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: (!e.key.is_empty()).then(|| e.key.clone()),
            message: e.to_string(),
        }
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> ApiError {
        let (status, field) = match &e {
            VmError::NotFound { .. } => (StatusCode::NOT_FOUND, Some("name".to_string())),
            VmError::State { .. } => (StatusCode::CONFLICT, None),
            VmError::Invalid { field, .. } => (StatusCode::BAD_REQUEST, Some(field.clone())),
            VmError::Failed(_) => (StatusCode::CONFLICT, None),
        };
        ApiError {
            status,
            field,
            message: e.to_string(),
        }
    }
}

impl From<AddError> for ApiError {
    fn from(e: AddError) -> ApiError {
        match e {
            AddError::Exists(_) => ApiError::new(StatusCode::CONFLICT, Some("name"), e.to_string()),
            // The VMs together do not fit (pools, host memory, mappings).
            AddError::Invalid(c) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                (!c.key.is_empty()).then_some(c.key.as_str()),
                c.to_string(),
            ),
            AddError::Snapshot(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("path"),
                e.to_string(),
            ),
            AddError::Host(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: &self.message,
            field: self.field.as_deref(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}
