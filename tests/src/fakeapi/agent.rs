//! The fake API server set up for an agent under test.

use std::net::TcpListener;

use anyhow::Context as _;

use super::{FakeApiServer, rules_from};

/// A fake API server for an agent running in `node`'s network namespace: bound
/// on that namespace's loopback (the agent reaches it at 127.0.0.1), allowing
/// exactly the agent's RBAC (`conndrain::kubernetes::API_CALLS`), with a
/// kubeconfig for it in a temporary directory.
pub struct AgentApi {
    pub api: FakeApiServer,
    pub kubeconfig: std::path::PathBuf,
    _dir: crate::TempDir,
}

impl AgentApi {
    pub fn start(node: &crate::Netns) -> anyhow::Result<Self> {
        let listener = crate::run_in(node, || TcpListener::bind("127.0.0.1:0"))??;
        let api = FakeApiServer::start(listener);
        api.set_rbac(rules_from(conndrain::kubernetes::API_CALLS));
        let dir = crate::TempDir::new()?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "127.0.0.1")?;
        Ok(Self { api, kubeconfig, _dir: dir })
    }

    /// The `--kubeconfig` argument.
    #[must_use]
    pub fn kubeconfig_arg(&self) -> String {
        self.kubeconfig.to_string_lossy().into_owned()
    }

    /// Serves again after [`FakeApiServer::stop`], on the same address in
    /// `node` (the namespace given to [`start`](Self::start)): the second
    /// half of an apiserver restart.
    pub fn resume(&self, node: &crate::Netns) -> anyhow::Result<()> {
        let addr = self.api.addr();
        let listener = crate::run_in(node, || TcpListener::bind(addr))?
            .with_context(|| format!("binding the fake API server to {addr} again in {}", node.name()))?;
        self.api.resume(listener);
        Ok(())
    }
}
