//! Global settings: `local prefix`/`local inet6`, `agentx`, `metrics`,
//! `staggered start`.

use super::*;

impl FileParser<'_> {
    pub(super) fn local(&mut self) -> Result<()> {
        let t = self.peek().clone();
        match self.peek_word() {
            Some("prefix") => {
                self.advance();
                let (s, at) = self.value("local prefix")?;
                self.st.cfg.globals.local_prefix = parse_prefix4(&s, at)?;
            }
            Some("inet6") => {
                self.advance();
                let mut p = DEFAULT_LOCAL_PREFIX6;
                if self.peek_word() == Some("prefix") {
                    self.advance();
                    let (s, at) = self.value("local inet6 prefix")?;
                    p = parse_prefix6(&s, at)?;
                }
                self.st.cfg.globals.local_inet6 = Some(p);
            }
            _ => {
                return Err(err(
                    self.loc(&t),
                    format!(
                        "expected \"prefix\" or \"inet6\" after local, found {}",
                        t.tok.describe()
                    ),
                ))
            }
        }
        Ok(())
    }

    pub(super) fn agentx(&mut self, at: Location) -> Result<()> {
        let mut a = AgentX::default();
        loop {
            match self.peek_word() {
                Some("context") if a.context.is_none() => {
                    self.advance();
                    a.context = Some(self.value("agentx context")?.0);
                }
                Some("path") if a.path.is_none() => {
                    self.advance();
                    a.path = Some(self.path("agentx path")?);
                }
                _ => break,
            }
        }
        self.st.cfg.globals.agentx = Some(a);
        self.warn(at, "agentx is not supported; ignored");
        Ok(())
    }

    /// `metrics listen PATH | ADDR:PORT`: an absolute unix socket path,
    /// or a loopback address, so only the host's scrapers reach it.
    pub(super) fn metrics(&mut self) -> Result<()> {
        self.expect_word("listen", "metrics")?;
        let (s, at) = self.value("metrics listen address")?;
        let listen = if s.starts_with('/') {
            MetricsListen::Unix(PathBuf::from(&s))
        } else {
            let addr: std::net::SocketAddr = s.parse().map_err(|_| {
                err(
                    at.clone(),
                    format!(
                        "metrics listen \"{s}\": expected an absolute socket path or ADDRESS:PORT"
                    ),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(err(
                    at,
                    format!("metrics listen {addr}: only a loopback address (127.0.0.0/8, ::1) is allowed"),
                ));
            }
            MetricsListen::Tcp(addr)
        };
        self.st.cfg.globals.metrics_listen = Some(listen);
        Ok(())
    }

    pub(super) fn staggered(&mut self) -> Result<()> {
        self.expect_word("start", "staggered")?;
        self.expect_word("parallel", "staggered start")?;
        let parallel = self.number("parallel", 1, u32::MAX)?;
        self.expect_word("delay", "parallel count")?;
        let delay = self.number("delay", 0, u32::MAX)?;
        self.st.cfg.globals.staggered = Some(Staggered { parallel, delay });
        Ok(())
    }
}
