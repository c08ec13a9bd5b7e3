//! Why a run could not do what it set out to. Every variant ends up as the report's `error`
//! string; none of them aborts the process.

use petrel_codec::{DecodeError, ReasonCode};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: broker closed the connection")]
    Closed { what: String },
    #[error("{what}: the run's timeout passed")]
    Timeout { what: String },
    #[error("{what}: broker refused with reason code {code:#04x}")]
    Refused { what: String, code: u8 },
    #[error("{what}: broker sent a malformed packet: {source}")]
    Malformed {
        what: String,
        #[source]
        source: DecodeError,
    },
    #[error("{what}: unexpected {packet} from the broker")]
    Unexpected { what: String, packet: &'static str },
    #[error("{0}")]
    Limit(String),
    #[error("--before-publish: {0}")]
    Hook(String),
}

impl BenchError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> BenchError {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn refused(what: impl Into<String>, code: ReasonCode) -> BenchError {
        BenchError::Refused {
            what: what.into(),
            code: code.0,
        }
    }
}
