//! The broker's error type for gRPC handlers, and its one mapping to
//! `tonic::Status` (the gateway maps those codes to JSON-RPC codes).

/// What a request to the broker can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request itself is wrong; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named sandbox does not exist / is not running.
    #[error("{0}")]
    NotFound(String),
    /// A limit on concurrent work is reached; retry later.
    #[error("{0}")]
    Busy(String),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The operation was attempted and failed.
    #[error("{0}")]
    Failed(String),
}

impl From<BrokerError> for tonic::Status {
    fn from(e: BrokerError) -> Self {
        let msg = e.to_string();
        match e {
            BrokerError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            BrokerError::NotFound(_) => tonic::Status::not_found(msg),
            BrokerError::Busy(_) => tonic::Status::resource_exhausted(msg),
            BrokerError::ShuttingDown => tonic::Status::unavailable(msg),
            BrokerError::Failed(_) => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_kind_has_its_code_and_keeps_the_message() {
        for (e, code) in [
            (
                BrokerError::InvalidArgument("bad".into()),
                Code::InvalidArgument,
            ),
            (BrokerError::NotFound("bad".into()), Code::NotFound),
            (BrokerError::Busy("bad".into()), Code::ResourceExhausted),
            (BrokerError::Failed("bad".into()), Code::Internal),
        ] {
            let s = tonic::Status::from(e);
            assert_eq!((s.code(), s.message()), (code, "bad"));
        }
        assert_eq!(
            tonic::Status::from(BrokerError::ShuttingDown).code(),
            Code::Unavailable
        );
    }
}
