//! The one error type of the service layer, and its mapping to transports.
//!
//! Every failure a client can see is a [`ServiceError`] with a [`Code`]; the
//! code decides the HTTP status (and, with the gRPC layer, the gRPC status),
//! so all transports agree. Expected refusals ("no spins left", "stock
//! gone") are codes too, answered with 409 and a message that says what to
//! do, never a 500.

use std::fmt;

/// Machine-readable error codes of the public API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// A field broke a rule (400).
    InvalidArgument,
    /// The body is not JSON (400).
    MalformedJson,
    /// The body is not declared as JSON (400).
    UnsupportedMediaType,
    /// The body is larger than the limit (400).
    PayloadTooLarge,
    /// No key, or an unknown key (401).
    Unauthenticated,
    /// A valid key that may not do this (403).
    PermissionDenied,
    /// The entity does not exist (404).
    NotFound,
    /// The entity already exists (409).
    AlreadyExists,
    /// The same id was used before with another body (409).
    IdempotencyConflict,
    /// A game refused: no entitlement, not enough points, daily limit,
    /// stock gone (409).
    FailedPrecondition,
    /// The node cannot serve now (storage failed, shutting down): retry
    /// elsewhere or later (503).
    Unavailable,
    /// A bug or an I/O failure (500).
    Internal,
}

impl Code {
    /// The code's name in error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::MalformedJson => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::FailedPrecondition => "failed_precondition",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The gRPC status code of this code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidArgument | Self::MalformedJson | Self::UnsupportedMediaType | Self::PayloadTooLarge => {
                tonic::Code::InvalidArgument
            }
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::IdempotencyConflict => tonic::Code::Aborted,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status of this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument | Self::MalformedJson | Self::UnsupportedMediaType | Self::PayloadTooLarge => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::AlreadyExists | Self::IdempotencyConflict | Self::FailedPrecondition => 409,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

/// A failure as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    pub code: Code,
    /// The offending field, as a path into the request (`segments[1].weight`).
    pub field: Option<String>,
    pub message: String,
    /// A finer reason for 409s (`daily_limit`, `out_of_stock`, ...).
    pub reason: Option<&'static str>,
}

impl ServiceError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, field: None, message: message.into(), reason: None }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: Code::InvalidArgument, field: Some(field.into()), message: message.into(), reason: None }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(Code::NotFound, format!("{what} {id:?} does not exist"))
    }

    pub fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        Self { code: Code::FailedPrecondition, field: None, message: message.into(), reason: Some(reason) }
    }

    pub fn internal(message: impl fmt::Display) -> Self {
        Self::new(Code::Internal, format!("internal error: {message}"))
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {field}: {}", self.code.as_str(), self.message),
            None => write!(f, "{}: {}", self.code.as_str(), self.message),
        }
    }
}

impl std::error::Error for ServiceError {}

impl From<bazaar_games::DefinitionError> for ServiceError {
    fn from(error: bazaar_games::DefinitionError) -> Self {
        Self::invalid(error.field, error.message)
    }
}

impl From<crate::storage::StorageError> for ServiceError {
    fn from(error: crate::storage::StorageError) -> Self {
        match error {
            crate::storage::StorageError::Unavailable(message) => Self::unavailable(message),
            other => Self::internal(other),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
