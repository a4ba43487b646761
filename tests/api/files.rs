//! The Files API over real HTTP: upload, list and page, retrieve, download, delete, limits,
//! malformed uploads, and files surviving a restart on the same data dir.

use crate::common;
use crate::support;

use std::path::{Path, PathBuf};

use serde_json::Value;

use common::multipart::{form, Part, BOUNDARY};
use common::server::TestServer;
use support::{assert_error, assert_schema_allowing_null, client};

async fn post_form(server: &TestServer, parts: &[Part<'_>]) -> reqwest::Response {
    client()
        .post(server.url("/v1/files"))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(form(parts))
        .send()
        .await
        .expect("upload request")
}

fn check_file(f: &Value) {
    // OpenAI sends `status_details: null` although its schema says string.
    assert_schema_allowing_null(f, "OpenAIFile", &["status_details"]);
    assert!(f["id"].as_str().unwrap().starts_with("file-"), "{f}");
    assert_eq!(f["status"], "processed");
    assert!(f["status_details"].is_null());
    let created = f["created_at"].as_i64().unwrap();
    assert!(created > 1_600_000_000 && created < 10_000_000_000, "seconds: {created}");
}

async fn upload(server: &TestServer, filename: &str, purpose: &str, content: &[u8]) -> Value {
    let parts = [
        Part::Text("purpose", purpose),
        Part::File { name: "file", filename: Some(filename), content },
    ];
    let r = post_form(server, &parts).await;
    assert_eq!(r.status(), 200, "upload of {filename}");
    let f: Value = r.json().await.unwrap();
    check_file(&f);
    assert_eq!(f["filename"], filename);
    assert_eq!(f["purpose"], purpose);
    assert_eq!(f["bytes"].as_u64().unwrap(), content.len() as u64);
    f
}

async fn get(server: &TestServer, path: &str) -> reqwest::Response {
    client().get(server.url(path)).send().await.expect("request")
}

async fn content(server: &TestServer, id: &str) -> Vec<u8> {
    let r = get(server, &format!("/v1/files/{id}/content")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    r.bytes().await.unwrap().to_vec()
}

async fn list(server: &TestServer, query: &str) -> Value {
    let r = get(server, &format!("/v1/files{query}")).await;
    assert_eq!(r.status(), 200, "GET /v1/files{query}");
    let page: Value = r.json().await.unwrap();
    assert_schema_allowing_null(
        &page,
        "ListFilesResponse",
        &["status_details", "first_id", "last_id"],
    );
    assert_eq!(page["object"], "list");
    let data = page["data"].as_array().unwrap();
    assert_eq!(page["first_id"], data.first().map_or(Value::Null, |f| f["id"].clone()));
    assert_eq!(page["last_id"], data.last().map_or(Value::Null, |f| f["id"].clone()));
    page
}

fn ids(page: &Value) -> Vec<String> {
    page["data"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap().to_string()).collect()
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Bytes that are not UTF-8 and cover every byte value, over several read chunks.
fn binary_content() -> Vec<u8> {
    (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

const JSONL: &[u8] =
    b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n";

#[tokio::test]
async fn upload_retrieve_download_delete() {
    let server = TestServer::start_tiny(|_| {}).await;
    let f = upload(&server, "train.jsonl", "fine-tune", JSONL).await;
    let id = f["id"].as_str().unwrap();

    let r = get(&server, &format!("/v1/files/{id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), f);
    assert_eq!(content(&server, id).await, JSONL);

    // Not JSONL, not UTF-8: stored anyway, returned byte for byte.
    let bin = binary_content();
    assert!(std::str::from_utf8(&bin).is_err());
    let b = upload(&server, "blob.bin", "user_data", &bin).await;
    let bin_id = b["id"].as_str().unwrap();
    assert_ne!(bin_id, id);
    assert_eq!(content(&server, bin_id).await, bin);
    let empty = upload(&server, "empty.jsonl", "fine-tune", b"").await;
    assert!(content(&server, empty["id"].as_str().unwrap()).await.is_empty());

    let r = client().delete(server.url(&format!("/v1/files/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deleted: Value = r.json().await.unwrap();
    assert_schema_allowing_null(&deleted, "DeleteFileResponse", &[]);
    assert_eq!(deleted, serde_json::json!({"id": id, "object": "file", "deleted": true}));

    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        let e = assert_error(get(&server, &path).await, 404, Some("file_id")).await;
        assert_eq!(e["code"], "file_not_found");
        assert!(e["message"].as_str().unwrap().contains(id), "{e}");
    }
    let r = client().delete(server.url(&format!("/v1/files/{id}"))).send().await.unwrap();
    assert_error(r, 404, Some("file_id")).await;
    assert_eq!(ids(&list(&server, "?order=asc").await), [bin_id, empty["id"].as_str().unwrap()]);
    // The deleted file's blob is gone; the others remain.
    assert_eq!(files_under(&server.data_dir().join("blobs")).len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn listing_filters_orders_and_pages() {
    let server = TestServer::start_tiny(|_| {}).await;
    let mut uploaded = Vec::new();
    for (i, purpose) in
        ["fine-tune", "batch", "fine-tune", "user_data", "fine-tune"].iter().enumerate()
    {
        let f = upload(&server, &format!("f{i}.jsonl"), purpose, JSONL).await;
        uploaded.push(f["id"].as_str().unwrap().to_string());
    }
    let newest_first: Vec<String> = uploaded.iter().rev().cloned().collect();

    let all = list(&server, "").await;
    assert_eq!(ids(&all), newest_first, "default order is desc");
    assert_eq!(all["has_more"], false);
    assert_eq!(ids(&list(&server, "?order=asc").await), uploaded);

    let tune = list(&server, "?purpose=fine-tune&order=asc").await;
    assert_eq!(ids(&tune), [uploaded[0].clone(), uploaded[2].clone(), uploaded[4].clone()]);
    let none = list(&server, "?purpose=evals").await;
    assert_eq!(
        (ids(&none).len(), &none["first_id"], &none["has_more"]),
        (0, &Value::Null, &false.into())
    );

    // Page through with limit 2 in both orders.
    for (order, expected) in [("asc", &uploaded), ("desc", &newest_first)] {
        let mut seen = Vec::new();
        let mut after = String::new();
        for round in 0.. {
            let page = list(&server, &format!("?order={order}&limit=2{after}")).await;
            seen.extend(ids(&page));
            assert!(ids(&page).len() <= 2);
            if page["has_more"] == false {
                assert_eq!(round, 2, "5 files in pages of 2");
                break;
            }
            after = format!("&after={}", page["last_id"].as_str().unwrap());
        }
        assert_eq!(&seen, expected, "order {order}");
    }
    let page = list(&server, &format!("?purpose=fine-tune&limit=1&after={}", uploaded[4])).await;
    assert_eq!((ids(&page), &page["has_more"]), (vec![uploaded[2].clone()], &true.into()));

    for (query, param) in [
        ("?limit=0", "limit"),
        ("?limit=10001", "limit"),
        ("?limit=x", "limit"),
        ("?order=newest", "order"),
        ("?after=file-unknown", "after"),
    ] {
        assert_error(get(&server, &format!("/v1/files{query}")).await, 400, Some(param)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn oversize_uploads_get_413_and_leave_nothing_behind() {
    let limit = 4096;
    // A request limit below the upload limit: uploads have a body limit of their own.
    let server = TestServer::start_tiny(|c| {
        c.max_upload_bytes = limit;
        c.max_request_bytes = 1024;
    })
    .await;
    let blobs = server.data_dir().join("blobs");
    for size in [limit + 1, 64 << 10] {
        let big = vec![b'x'; size];
        let parts = [
            Part::Text("purpose", "fine-tune"),
            Part::File { name: "file", filename: Some("big.jsonl"), content: &big },
        ];
        let e = assert_error(post_form(&server, &parts).await, 413, None).await;
        assert!(e["message"].as_str().unwrap().contains(&limit.to_string()), "{e}");
        assert_eq!(files_under(&blobs), Vec::<PathBuf>::new(), "no temp file after {size} bytes");
    }
    // A body far past the limit is cut off while it streams in.
    let huge = vec![b'y'; 3 << 20];
    let parts = [
        Part::Text("purpose", "fine-tune"),
        Part::File { name: "file", filename: Some("huge.jsonl"), content: &huge },
    ];
    match client()
        .post(server.url("/v1/files"))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(form(&parts))
        .send()
        .await
    {
        Ok(r) => {
            assert_error(r, 413, None).await;
        }
        // The server may answer and close before the client has sent everything.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    assert_eq!(files_under(&blobs), Vec::<PathBuf>::new());
    // Exactly at the limit is fine.
    upload(&server, "fits.jsonl", "fine-tune", &vec![b'z'; limit]).await;
    assert_eq!(files_under(&blobs).len(), 1);
    let list = list(&server, "").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn malformed_uploads_are_400_naming_the_field() {
    let server = TestServer::start_tiny(|_| {}).await;
    let file = Part::File { name: "file", filename: Some("a.jsonl"), content: JSONL };
    let cases: Vec<(Vec<Part>, &str)> = vec![
        (vec![Part::Text("purpose", "fine-tune")], "file"),
        (vec![Part::File { name: "file", filename: Some("a.jsonl"), content: JSONL }], "purpose"),
        (
            vec![
                Part::Text("purpose", "fine_tune"),
                Part::File { name: "file", filename: Some("a.jsonl"), content: JSONL },
            ],
            "purpose",
        ),
        (vec![Part::Text("purpose", "fine-tune-results"), file], "purpose"),
        (
            vec![
                Part::Text("purpose", "fine-tune"),
                Part::File { name: "file", filename: None, content: JSONL },
            ],
            "file",
        ),
        (vec![Part::Text("purpose", "fine-tune"), Part::Text("file", "not a file part")], "file"),
    ];
    for (parts, param) in &cases {
        assert_error(post_form(&server, parts).await, 400, Some(param)).await;
    }
    // Not multipart at all.
    let r = client()
        .post(server.url("/v1/files"))
        .json(&serde_json::json!({"file": "x", "purpose": "fine-tune"}))
        .send()
        .await
        .unwrap();
    let e = assert_error(r, 400, Some("file")).await;
    assert!(e["message"].as_str().unwrap().contains("multipart"), "{e}");
    // A file streamed before its purpose was found missing is not kept.
    assert_eq!(files_under(&server.data_dir().join("blobs")), Vec::<PathBuf>::new());
    assert!(ids(&list(&server, "").await).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn files_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let first = TestServer::start_tiny(|c| c.data_dir = Some(dir.clone())).await;
    assert_eq!(first.data_dir(), dir);
    let bin = binary_content();
    let a = upload(&first, "train.jsonl", "fine-tune", JSONL).await;
    let b = upload(&first, "blob.bin", "batch", &bin).await;
    first.stop().await;

    let second = TestServer::start_tiny(|c| c.data_dir = Some(dir.clone())).await;
    assert_eq!(
        ids(&list(&second, "?order=asc").await),
        [&a["id"], &b["id"]].map(|v| v.as_str().unwrap().to_string())
    );
    let r = get(&second, &format!("/v1/files/{}", b["id"].as_str().unwrap())).await;
    assert_eq!(r.json::<Value>().await.unwrap(), b);
    assert_eq!(content(&second, a["id"].as_str().unwrap()).await, JSONL);
    assert_eq!(content(&second, b["id"].as_str().unwrap()).await, bin);
    second.stop().await;
}
