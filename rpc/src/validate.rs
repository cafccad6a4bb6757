//! Edge checks: a request that breaks a limit is refused whole, with an error that
//! names the limit, before anything of it reaches raft.

use rangekv_types::limits;

use crate::proto::{self, InvalidArgument};

/// A broken limit or malformed request. Converts to gRPC `INVALID_ARGUMENT` and to the
/// `InvalidArgument` error detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The limit broken, as `name=value` (e.g. `key_bytes_max=8192`), or the rule.
    pub limit: String,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (limit {})", self.message, self.limit)
    }
}

impl std::error::Error for Invalid {}

impl From<Invalid> for tonic::Status {
    fn from(invalid: Invalid) -> Self {
        tonic::Status::invalid_argument(invalid.to_string())
    }
}

impl From<Invalid> for proto::Error {
    fn from(invalid: Invalid) -> Self {
        proto::Error {
            kind: Some(proto::error::Kind::InvalidArgument(InvalidArgument {
                message: invalid.message,
                limit: invalid.limit,
            })),
        }
    }
}

/// Checks a user key: not empty, at most [`limits::KEY_BYTES_MAX`] bytes.
pub fn key(key: &[u8]) -> Result<(), Invalid> {
    if key.is_empty() {
        return Err(Invalid {
            limit: "key_bytes_min=1".into(),
            message: "key is empty".into(),
        });
    }
    if key.len() > limits::KEY_BYTES_MAX {
        return Err(Invalid {
            limit: format!("key_bytes_max={}", limits::KEY_BYTES_MAX),
            message: format!("key has {} bytes", key.len()),
        });
    }
    Ok(())
}

/// Checks a user value: at most [`limits::VALUE_BYTES_MAX`] bytes.
pub fn value(value: &[u8]) -> Result<(), Invalid> {
    if value.len() > limits::VALUE_BYTES_MAX {
        return Err(Invalid {
            limit: format!("value_bytes_max={}", limits::VALUE_BYTES_MAX),
            message: format!("value has {} bytes", value.len()),
        });
    }
    Ok(())
}

/// Checks a batch's size: at most [`limits::BATCH_KEYS_MAX`] keys.
pub fn batch_len(len: usize) -> Result<(), Invalid> {
    if len > limits::BATCH_KEYS_MAX {
        return Err(Invalid {
            limit: format!("batch_keys_max={}", limits::BATCH_KEYS_MAX),
            message: format!("batch has {len} keys"),
        });
    }
    Ok(())
}

/// Checks a key span `[start, end)`: `end` empty (unbounded) or greater than `start`.
pub fn span(start: &[u8], end: &[u8]) -> Result<(), Invalid> {
    if start.len() > limits::KEY_BYTES_MAX || end.len() > limits::KEY_BYTES_MAX {
        return Err(Invalid {
            limit: format!("key_bytes_max={}", limits::KEY_BYTES_MAX),
            message: "span bound is longer than a key may be".into(),
        });
    }
    if !end.is_empty() && end <= start {
        return Err(Invalid {
            limit: "start_key<end_key".into(),
            message: "span is empty or reversed".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RangeDescriptor;

    #[test]
    fn keys_over_the_limit_are_refused_naming_it() {
        assert!(key(b"k").is_ok());
        assert!(key(&vec![b'k'; limits::KEY_BYTES_MAX]).is_ok());
        let err = key(&vec![b'k'; limits::KEY_BYTES_MAX + 1]).unwrap_err();
        assert_eq!(err.limit, "key_bytes_max=8192");
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("key_bytes_max=8192"));
        assert!(key(b"").is_err());
    }

    #[test]
    fn values_over_the_limit_are_refused() {
        assert!(value(&[]).is_ok());
        assert!(value(&vec![0; limits::VALUE_BYTES_MAX]).is_ok());
        let err = value(&vec![0; limits::VALUE_BYTES_MAX + 1]).unwrap_err();
        assert!(err.limit.starts_with("value_bytes_max="));
    }

    #[test]
    fn spans_must_be_ordered() {
        assert!(span(b"a", b"b").is_ok());
        assert!(span(b"a", b"").is_ok());
        assert!(span(b"b", b"a").is_err());
        assert!(span(b"a", b"a").is_err());
        assert!(batch_len(limits::BATCH_KEYS_MAX + 1).is_err());
    }

    #[test]
    fn descriptor_contains_its_span_only() {
        let bounded = RangeDescriptor {
            start_key: b"b".to_vec().into(),
            end_key: b"d".to_vec().into(),
            ..Default::default()
        };
        assert!(!bounded.contains_key(b"a"));
        assert!(bounded.contains_key(b"b"));
        assert!(bounded.contains_key(b"c\xff"));
        assert!(!bounded.contains_key(b"d"));
        let last = RangeDescriptor {
            start_key: b"x".to_vec().into(),
            ..Default::default()
        };
        assert!(last.contains_key(b"\xff\xff"));
        assert!(!last.contains_key(b"w"));
    }

    #[test]
    fn error_detail_round_trips_through_protobuf() {
        use prost::Message;
        let detail: proto::Error = key(b"").unwrap_err().into();
        let bytes = detail.encode_to_vec();
        let decoded = proto::Error::decode(&bytes[..]).unwrap();
        assert_eq!(decoded, detail);
    }
}
