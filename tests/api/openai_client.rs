//! The official `openai` Python client against a real server, as users drive it.
//! Needs a Python with `openai` installed: `$COSERVE_TEST_PYTHON` (set by `.ci/run`, which
//! creates `.venv`), else `.venv/bin/python`, else `python3`.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::server::TestServer;

const SCRIPT: &str = r#"
import json, os, sys
import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["BASE_URL"] + "/v1", api_key="unused", max_retries=0)
model = os.environ["MODEL"]

models = client.models.list()
assert [m.id for m in models.data] == [model], models
assert client.models.retrieve(model).id == model

c = client.completions.create(model=model, prompt="hello", max_tokens=5, temperature=0, logprobs=2)
assert c.object == "text_completion" and len(c.choices) == 1, c
assert c.usage.completion_tokens == len(c.choices[0].logprobs.tokens), c
assert c.choices[0].finish_reason in ("stop", "length"), c
batch = client.completions.create(model=model, prompt=["a", "b"], max_tokens=3, n=2, temperature=0)
assert sorted(ch.index for ch in batch.choices) == [0, 1, 2, 3], batch

pieces, usage = [], None
for chunk in client.completions.create(model=model, prompt="hello", max_tokens=5, temperature=0,
                                       stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        pieces.append(ch.text)
assert "".join(pieces) == c.choices[0].text, (pieces, c.choices[0].text)
assert usage is not None and usage.completion_tokens == c.usage.completion_tokens, usage

messages = [{"role": "user", "content": "hi there"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                   logprobs=True, top_logprobs=3, seed=1)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant", r
assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens, r
assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content), r

roles, text = [], []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                            temperature=0, seed=1, stream=True):
    for ch in chunk.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            text.append(ch.delta.content)
assert roles == ["assistant"], roles
assert "".join(text) == (r.choices[0].message.content or ""), (text, r.choices[0].message.content)

try:
    client.completions.create(model=model, prompt="x", temperature=-1)
    raise SystemExit("temperature=-1 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "temperature", e.body
try:
    client.completions.create(model="no-such-model", prompt="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

import tempfile
data = b'{"prompt": "a", "completion": "b"}\n'
with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as t:
    t.write(data)
    path = t.name
with open(path, "rb") as fh:
    f = client.files.create(file=fh, purpose="fine-tune")
assert f.object == "file" and f.id.startswith("file-") and f.purpose == "fine-tune", f
assert f.bytes == len(data) and f.filename == os.path.basename(path), f
with open(path, "rb") as fh:
    g = client.files.create(file=("second.jsonl", fh.read()), purpose="fine-tune")
os.unlink(path)
assert [x.id for x in client.files.list(purpose="fine-tune").data] == [g.id, f.id]
# Iterating follows `has_more` and `after` page by page.
assert [x.id for x in client.files.list(limit=1, order="asc")] == [f.id, g.id]
assert client.files.retrieve(f.id) == f, client.files.retrieve(f.id)
assert client.files.content(f.id).content == data
for x in (f, g):
    d = client.files.delete(x.id)
    assert d.deleted and d.id == x.id and d.object == "file", d
try:
    client.files.retrieve(f.id)
    raise SystemExit("a deleted file was found")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
try:
    client.files.create(file=("x.jsonl", data), purpose="fine-tune-results")
    raise SystemExit("an upload with purpose fine-tune-results was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "purpose", e.body

# Fine-tuning, as a user of OpenAI's API would drive it.
import time
train = "".join('{"prompt": "fact %d is", "completion": " %d"}\n' % (i, i * 3) for i in range(4))
tf = client.files.create(file=("train.jsonl", train.encode()), purpose="fine-tune")
job = client.fine_tuning.jobs.create(
    model=model, training_file=tf.id, seed=5, suffix="client",
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
)
assert job.object == "fine_tuning.job" and job.status == "validating_files", job
for _ in range(600):
    job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(0.05)
assert job.status == "succeeded", job
assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2, job
assert job.fine_tuned_model.startswith("ft:"), job
assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=10)]
events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))
assert len(events) > 3 and events[0].message == "The job has successfully completed", events[:3]
assert all(e.object == "fine_tuning.job.event" for e in events)
cks = client.fine_tuning.jobs.checkpoints.list(job.id).data
assert cks and cks[0].step_number == 4 and cks[0].fine_tuning_job_id == job.id, cks
assert cks[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-4"), cks
csv = client.files.content(job.result_files[0]).content.decode()
assert csv.startswith("step,train_loss"), csv
out = client.completions.create(model=job.fine_tuned_model, prompt="fact 1 is", max_tokens=3)
assert out.model == job.fine_tuned_model, out
assert job.fine_tuned_model in [m.id for m in client.models.list()]
deleted = client.models.delete(job.fine_tuned_model)
assert deleted.deleted, deleted
try:
    client.fine_tuning.jobs.cancel(job.id)
    raise SystemExit("a finished job was cancelled")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
try:
    client.fine_tuning.jobs.retrieve("ftjob-missing")
    raise SystemExit("an unknown job was found")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
print("openai client: all checks passed")
"#;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("COSERVE_TEST_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_round_trips() {
    let server = TestServer::start_tiny(|_| {}).await;
    let (base, model) = (server.base_url().to_string(), server.model_id().to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg("-c")
            .arg(SCRIPT)
            .env("BASE_URL", base)
            .env("MODEL", model)
            .output()
    })
    .await
    .expect("join")
    .expect("python runs (install it, or run .ci/run which sets up .venv with the openai package)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    server.stop().await;
}
