//! Placeholder for the kernel (sockmap) fastpath. The tech lead owns this
//! file and replaces it; the control plane only relies on this interface.

use tokio::net::TcpStream;

use super::{ConnInfo, Transfer};

pub struct SockmapPlane;

impl SockmapPlane {
    pub fn load() -> anyhow::Result<Self> {
        anyhow::bail!("kernel fastpath not built yet")
    }

    pub async fn carry(
        &self,
        _client: TcpStream,
        _upstream: TcpStream,
        _conn: &ConnInfo,
    ) -> Transfer {
        unimplemented!("kernel fastpath not built yet")
    }
}
