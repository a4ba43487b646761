//! Chat templates (Jinja) rendered with minijinja the way Hugging Face's
//! `apply_chat_template` renders them: `trim_blocks` and `lstrip_blocks` on, Python string
//! methods available, `raise_exception(msg)` and a `tojson` that writes what Python's
//! `json.dumps` writes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Value};

use super::ModelError;

/// One chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

const NAME: &str = "chat_template";

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a template; `bos_token`/`eos_token` are exposed to it as variables.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template in GGUF metadata (`tokenizer.chat_template`), if there is one.
    pub fn from_gguf(
        metadata: &HashMap<String, gguf_file::Value>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Self>, ModelError> {
        match metadata.get("tokenizer.chat_template") {
            Some(gguf_file::Value::String(src)) => Self::new(src, bos_token, eos_token).map(Some),
            _ => Ok(None),
        }
    }

    /// The template in a `tokenizer_config.json`, if there is one.
    pub fn from_tokenizer_config(
        path: &Path,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Self>, ModelError> {
        let bytes = std::fs::read(path)
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let config: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ModelError::invalid(path, format!("not valid JSON: {e}")))?;
        match source_from_tokenizer_config(&config) {
            Some(src) => Self::new(&src, bos_token, eos_token).map(Some),
            None => Ok(None),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self.env.get_template(NAME).map_err(template_error)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(template_error)
    }
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of `{name, template}`
/// of which "default" is used (as transformers does when no name is asked for), else the first.
pub fn source_from_tokenizer_config(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn template_error(e: Error) -> ModelError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    ModelError::ChatTemplate(msg)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`,
/// which is what transformers installs as `tojson` (minijinja's own escapes `<`, `>`, `&`, `'`
/// and drops the spaces after `,` and `:`).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "separators: two strings")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let json = PyJson { indent, ensure_ascii, sort_keys, item_sep, key_sep };
    let mut out = String::new();
    json.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match (v.is_integer(), f64::try_from(v.clone())) {
                (false, Ok(f)) if f.is_nan() => out.push_str("NaN"),
                (false, Ok(f)) if f.is_infinite() => {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
                }
                _ => out.push_str(&v.to_string()),
            },
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, ('{', '}'), &keys, depth, |out, key| {
                    self.string(out, &key.to_string());
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(key)?, depth + 1)
                })?;
            }
            ValueKind::Bytes => {
                self.string(out, &String::from_utf8_lossy(v.as_bytes().unwrap_or_default()))
            }
            _ => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, ('[', ']'), &items, depth, |out, item| {
                    self.write(out, item, depth + 1)
                })?;
            }
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        (open, close): (char, char),
        items: &[Value],
        depth: usize,
        mut each: impl FnMut(&mut String, &Value) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            each(out, item)?;
        }
        if !items.is_empty() {
            self.newline(out, depth);
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    fn render(src: &str, messages: &[ChatMessage]) -> Result<String, ModelError> {
        ChatTemplate::new(src, "<s>", "</s>")?.render(messages, true)
    }

    #[test]
    fn renders_variables_and_generation_prompt() {
        let src = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        let m = [msg("user", "hi")];
        assert_eq!(t.render(&m, true).expect("renders"), "<s>[user]hi</s>[assistant]");
        assert_eq!(t.render(&m, false).expect("renders"), "<s>[user]hi</s>");
        assert_eq!(t.source(), src);
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU: {{ m.content }}\n  {% endif %}\n{% endfor %}";
        assert_eq!(
            render(src, &[msg("user", "a"), msg("user", "b")]).expect("renders"),
            "U: a\nU: b\n"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0].content.strip() }}|{{ messages[0].content.startswith(' x') }}|{{ messages[0].role.upper() }}";
        assert_eq!(render(src, &[msg("user", " x y ")]).expect("renders"), "x y|True|USER");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        assert_eq!(render(src, &[msg("user", "a")]).expect("renders"), "ok");
        let e = render(src, &[msg("assistant", "a")]).expect_err("raises");
        assert!(e.to_string().contains("Conversation must start with user"), "{e}");
    }

    #[test]
    fn bad_templates_are_errors_not_panics() {
        let e = ChatTemplate::new("{% for %}", "", "").expect_err("syntax error");
        assert!(matches!(e, ModelError::ChatTemplate(_)), "{e}");
        let e = render("{{ messages | nosuchfilter }}", &[]).expect_err("unknown filter");
        assert!(matches!(e, ModelError::ChatTemplate(_)), "{e}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson(sort_keys=true) }}";
        // Python: json.dumps({"role": "user", "content": "<a> & 'b'\n\"é\""},
        //                    ensure_ascii=False, sort_keys=True)
        let out = render(src, &[msg("user", "<a> & 'b'\n\"é\"")]).expect("renders");
        assert_eq!(out, r#"{"content": "<a> & 'b'\n\"é\"", "role": "user"}"#);
        let src = "{{ [1, 2.5, none, true, {'k': []}] | tojson(indent=2) }}";
        assert_eq!(
            render(src, &[]).expect("renders"),
            "[\n  1,\n  2.5,\n  null,\n  true,\n  {\n    \"k\": []\n  }\n]"
        );
        let src = "{{ 'é\u{1F600}' | tojson(ensure_ascii=true) }}";
        assert_eq!(render(src, &[]).expect("renders"), r#""\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn tokenizer_config_sources() {
        let v: serde_json::Value = serde_json::json!({"chat_template": "x"});
        assert_eq!(source_from_tokenizer_config(&v).as_deref(), Some("x"));
        let v = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        assert_eq!(source_from_tokenizer_config(&v).as_deref(), Some("d"));
        assert_eq!(source_from_tokenizer_config(&serde_json::json!({})), None);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer_config.json");
        std::fs::write(&path, r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}"}"#)
            .expect("write");
        let t =
            ChatTemplate::from_tokenizer_config(&path, "<s>", "</s>").expect("ok").expect("some");
        assert_eq!(t.render(&[msg("user", "hi")], false).expect("renders"), "<s>hi");
        std::fs::write(&path, "{}").expect("write");
        assert!(ChatTemplate::from_tokenizer_config(&path, "", "").expect("ok").is_none());
    }
}
