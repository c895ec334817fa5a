//! The serde views the local API serves and the CLI reads: the wire format,
//! kept apart from the domain's own types (the node and steering build them,
//! `api` serves them), so this leaf imports nothing of the agent.

use serde::{Deserialize, Serialize};

/// A pinned flow, as `status` and `flows` show it (addresses as text, IPv4 unmapped).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinView {
    pub proto: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The address the backend sees as its peer (the client, or kube-proxy's SNAT address).
    pub backend_peer: String,
    pub pod: String,
    pub dead: bool,
}
