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

/// Why one `relay-client connect` tunnel could not be opened (the relay's side of it: the
/// local connection is already accepted).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The TCP connection to the relay failed.
    #[error("connecting to the relay: {0}")]
    Connect(std::io::Error),
    /// The relay's host is not a valid TLS server name.
    #[error("bad relay host name: {0}")]
    HostName(String),
    /// The TLS handshake with the relay failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The WebSocket upgrade was refused or broke (a status, a bad answer).
    #[error("opening the tunnel: {0}")]
    Handshake(String),
}
