//! Wire types shared by Hangar's HTTP API, its CLI and `hangar-init`.
//!
//! This crate is serde types and the one encoding rule they need on the wire (query values):
//! no I/O, no validation beyond what serde does and the spec's own range checks, no dependency on any runtime. Request bodies reject unknown fields so that a typo in a
//! client is an error instead of a silently ignored setting.

pub mod agent;
pub mod console;
pub mod error;
pub mod init;
pub mod sandbox;
pub mod stats;

pub use error::{ErrorBody, ErrorDetail};

/// Percent-encodes a query value (`?path=…`), keeping `/`, which paths are full of, readable.
pub fn encode_query(s: &str) -> String {
    const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(s, QUERY).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values() {
        assert_eq!(
            super::encode_query("/home/agent/a b&c=d"),
            "/home/agent/a%20b%26c%3Dd"
        );
        assert_eq!(super::encode_query("/ü"), "/%C3%BC");
    }
}
