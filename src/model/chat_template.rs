//! Chat templates (Jinja) rendered with minijinja.
//! (Interface fixed; implementation in progress.)

use super::ModelError;

/// One chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    _source: String,
}

impl ChatTemplate {
    /// Compiles a template; `bos_token`/`eos_token` are exposed to it as variables.
    pub fn new(source: &str, _bos_token: &str, _eos_token: &str) -> Result<Self, ModelError> {
        Ok(Self { _source: source.to_string() })
    }

    pub fn render(
        &self,
        _messages: &[ChatMessage],
        _add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        Err(ModelError::ChatTemplate("not implemented yet".into()))
    }
}
