//! A real server on 127.0.0.1 (random port) for HTTP tests.

use std::path::{Path, PathBuf};

use coserve::config::ServerConfig;
use coserve::server::RunningServer;

use super::tiny_model::{write_gguf, TinyShape};

pub struct TestServer {
    server: Option<RunningServer>,
    base_url: String,
    model_id: String,
    data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    /// The data dir made for this server, unless `configure` chose one.
    _data: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Serves the tiny random model; `configure` may change any option before start.
    pub async fn start_tiny(configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_gguf(dir.path(), &TinyShape::default());
        let mut s = Self::start_model(&path, configure).await;
        s._dir = Some(dir);
        s
    }

    /// Serves the model at `path` (None: the embedded default model). The server gets a fresh
    /// temporary data dir unless `configure` sets `data_dir` (e.g. to restart on the same one).
    pub async fn start_path(
        path: Option<&Path>,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start_path_on(path, configure, None).await
    }

    /// As `start_path`, computing on `backend` (`None`: the one the config names).
    pub async fn start_path_on(
        path: Option<&Path>,
        configure: impl FnOnce(&mut ServerConfig),
        backend: Option<coserve::engine::Backend>,
    ) -> Self {
        let mut cfg = ServerConfig::for_model(path.map(PathBuf::from));
        cfg.port = 0;
        cfg.threads = 2;
        configure(&mut cfg);
        let data = match cfg.data_dir {
            Some(_) => None,
            None => {
                let d = tempfile::tempdir().expect("tempdir");
                cfg.data_dir = Some(d.path().to_path_buf());
                Some(d)
            }
        };
        let data_dir = cfg.resolved_data_dir();
        let server = coserve::server::start_on(cfg, backend).await.expect("server starts");
        let base_url = format!("http://{}", server.addr());
        let model_id = server.model_id().to_string();
        Self { server: Some(server), base_url, model_id, data_dir, _dir: None, _data: data }
    }

    pub async fn start_model(path: &Path, configure: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_path(Some(path), configure).await
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Where this server keeps its durable state.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Graceful stop (the server also stops when the test's runtime ends).
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}
