//! The official `openai` Python client against the server, as users drive it: completions,
//! chat, streaming, models, and errors surfacing as the client's typed exceptions.
//!
//! Needs a Python with `openai` installed, named by COSERVE_TEST_PYTHON (.ci/run sets it up).
//! Without it the test is skipped locally and fails under CI.

mod common;

use std::process::Command;

use common::server::TestServer;

const SCRIPT: &str = r#"
import sys
import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
extra = {"ignore_eos": True}

r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0,
                              extra_body=extra)
assert r.object == "text_completion", r
assert r.choices[0].finish_reason == "length", r
assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 4, r.usage

chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=4,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body=extra))
assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
assert chunks[-1].usage.completion_tokens == 4, chunks[-1]

messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=4,
                                   temperature=0, logprobs=True, top_logprobs=2,
                                   extra_body=extra)
choice = r.choices[0]
assert choice.message.role == "assistant" and choice.finish_reason == "length", r
assert len(choice.logprobs.content) == 4
assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

stream = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                        temperature=0, stream=True, extra_body=extra)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert text == choice.message.content, (text, choice.message.content)

assert [m.id for m in client.models.list().data] == [model]
assert client.models.retrieve(model).id == model

try:
    client.completions.create(model=model, prompt="x", temperature=5)
    raise SystemExit("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.param == "temperature" and e.type == "invalid_request_error", e

try:
    client.chat.completions.create(model="nope", messages=messages)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

print("openai client ok")
"#;

#[tokio::test]
async fn the_openai_python_client_works() {
    let Some(python) = std::env::var_os("COSERVE_TEST_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must set COSERVE_TEST_PYTHON");
        eprintln!("skipped: set COSERVE_TEST_PYTHON to a Python with the openai package");
        return;
    };
    let server = TestServer::start_tiny(|c| c.kv_cache_memory = 64 << 20).await;
    let (base, model) = (server.base_url().to_string(), server.model_id().to_string());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python).arg("-c").arg(SCRIPT).arg(base).arg(model).output()
    })
    .await
    .expect("join")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client ok"), "{stdout}");
    server.stop().await;
}
