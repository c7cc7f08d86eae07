//! Agent errors, by the side that failed.

/// A failure of the agent as a whole (ends `run`).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The server refused the token (401) or the name (403): retrying cannot help.
    #[error("the relay-server refused this agent ({status}): {message}")]
    Refused {
        /// 401 or 403.
        status: u16,
        /// The server's explanation.
        message: String,
    },
    /// Bad local configuration (URLs, CA files).
    #[error("configuration: {0}")]
    Config(String),
}

/// A failed call to the relay-server.
#[derive(Debug, thiserror::Error)]
pub enum RelayCallError {
    /// Transport failure (connect, reset, timeout).
    #[error("relay-server unreachable: {0}")]
    Transport(String),
    /// The server answered with an unexpected status.
    #[error("relay-server answered {status}: {message}")]
    Status {
        /// Status code.
        status: u16,
        /// Body text.
        message: String,
    },
}
