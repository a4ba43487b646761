//! The OpenAI Files API: upload (multipart, streamed to disk), list, retrieve, download and
//! delete. Rows and blobs live in the `Store`; every store call runs on the blocking pool.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::models::ListObjectKind;
use super::AppState;
use crate::store::{BlobWriter, FileQuery, FileRow, Order, StoreError};

/// Default and largest `limit` of a listing, as OpenAI has them.
const MAX_LIST_LIMIT: usize = 10_000;
/// Upload bytes gathered before one blocking write: few thread hops, bounded memory.
const WRITE_CHUNK: usize = 1 << 20;
/// Read size when streaming a file's content back.
const READ_CHUNK: usize = 64 << 10;
/// Room in an upload's body for the multipart framing and the other fields.
const MULTIPART_OVERHEAD: usize = 1 << 20;
/// Longest accepted `purpose` field.
const MAX_PURPOSE_BYTES: usize = 256;

/// The body limit of `POST /v1/files` for a file limit of `max_upload_bytes`.
pub fn upload_body_limit(max_upload_bytes: usize) -> usize {
    max_upload_bytes.saturating_add(MULTIPART_OVERHEAD)
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileObjectKind {
    File,
}

/// OpenAI's `OpenAIFile`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileObject {
    /// `file-` and 32 hex digits.
    pub id: String,
    pub object: FileObjectKind,
    /// Size in bytes.
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    /// `fine-tune`, `fine-tune-results`, `batch`, `user_data`, ...
    pub purpose: String,
    /// Always `processed`: content is checked when a job uses the file.
    pub status: String,
    /// Always null (deprecated by OpenAI; job errors carry the details).
    #[schema(required = true)]
    pub status_details: Option<String>,
}

impl From<&FileRow> for FileObject {
    fn from(f: &FileRow) -> Self {
        Self {
            id: f.id.clone(),
            object: FileObjectKind::File,
            bytes: f.bytes,
            created_at: f.created_at,
            filename: f.filename.clone(),
            purpose: f.purpose.clone(),
            status: f.status.clone(),
            status_details: None,
        }
    }
}

/// OpenAI's `ListFilesResponse`; `first_id` and `last_id` are null for an empty page.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileList {
    pub object: ListObjectKind,
    pub data: Vec<FileObject>,
    #[schema(required = true)]
    pub first_id: Option<String>,
    #[schema(required = true)]
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// OpenAI's `DeleteFileResponse`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeletedFile {
    pub id: String,
    pub object: FileObjectKind,
    pub deleted: bool,
}

/// Purposes a client may upload for; `*-results`/`*_output` files are made by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum UploadPurpose {
    #[serde(rename = "fine-tune")]
    FineTune,
    #[serde(rename = "assistants")]
    Assistants,
    #[serde(rename = "batch")]
    Batch,
    #[serde(rename = "vision")]
    Vision,
    #[serde(rename = "user_data")]
    UserData,
    #[serde(rename = "evals")]
    Evals,
}

impl UploadPurpose {
    const ALL: [UploadPurpose; 6] = [
        UploadPurpose::FineTune,
        UploadPurpose::Assistants,
        UploadPurpose::Batch,
        UploadPurpose::Vision,
        UploadPurpose::UserData,
        UploadPurpose::Evals,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UploadPurpose::FineTune => "fine-tune",
            UploadPurpose::Assistants => "assistants",
            UploadPurpose::Batch => "batch",
            UploadPurpose::Vision => "vision",
            UploadPurpose::UserData => "user_data",
            UploadPurpose::Evals => "evals",
        }
    }

    fn parse(s: &str) -> Result<Self, ApiError> {
        if let Some(p) = Self::ALL.into_iter().find(|p| p.as_str() == s) {
            return Ok(p);
        }
        let names: Vec<&str> = Self::ALL.iter().map(|p| p.as_str()).collect();
        let message = if matches!(s, "fine-tune-results" | "assistants_output" | "batch_output") {
            format!("Files with purpose `{s}` are created by the server and cannot be uploaded")
        } else {
            format!("Invalid purpose `{s}`: expected one of {}", names.join(", "))
        };
        Err(ApiError::field("purpose", message))
    }
}

/// The multipart form of `POST /v1/files` (OpenAI's `CreateFileRequest`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct CreateFileRequest {
    /// The file's content; its filename is kept.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    purpose: UploadPurpose,
}

fn multipart_error(e: MultipartError, state: &AppState) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit: state.max_upload_bytes }
    } else {
        ApiError::invalid(None, format!("Invalid multipart body: {}", e.body_text()))
    }
}

#[utoipa::path(
    post,
    path = "/v1/files",
    tag = "files",
    request_body(content = CreateFileRequest, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The stored file", body = FileObject),
        (status = 400, description = "Missing or invalid field", body = ErrorResponse),
        (status = 413, description = "The file exceeds --max-upload-bytes", body = ErrorResponse),
    )
)]
pub async fn upload_file(
    State(state): State<Arc<AppState>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let mut multipart = multipart.map_err(|_| {
        ApiError::field(
            "file",
            "Uploads must be multipart/form-data with the fields `file` and `purpose`",
        )
    })?;
    let mut purpose = None;
    let mut upload: Option<(String, BlobWriter, String)> = None;
    while let Some(mut field) =
        multipart.next_field().await.map_err(|e| multipart_error(e, &state))?
    {
        match field.name() {
            Some("purpose") => {
                if purpose.is_some() {
                    return Err(ApiError::field("purpose", "`purpose` is given more than once"));
                }
                purpose = Some(UploadPurpose::parse(&read_purpose(field, &state).await?)?);
            }
            Some("file") => {
                if upload.is_some() {
                    return Err(ApiError::field("file", "Only one `file` may be uploaded"));
                }
                let filename = field
                    .file_name()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        ApiError::field("file", "`file` must be a file part with a filename")
                    })?
                    .to_string();
                let limit = state.max_upload_bytes as u64;
                let (id, writer) = state.store.call(move |s| s.begin_file(limit)).await?;
                let writer = stream_to_disk(&mut field, writer, &state).await?;
                upload = Some((id, writer, filename));
            }
            // Other fields (e.g. `expires_after`) are accepted and ignored.
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::field("purpose", "`purpose` is required"))?;
    let (id, writer, filename) =
        upload.ok_or_else(|| ApiError::field("file", "`file` is required"))?;
    let row =
        state.store.call(move |s| s.finish_file(id, writer, &filename, purpose.as_str())).await?;
    tracing::info!(file = %row.id, bytes = row.bytes, purpose = %row.purpose, "file stored");
    Ok(Json(FileObject::from(&row)))
}

async fn read_purpose(mut field: Field<'_>, state: &AppState) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, state))? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_PURPOSE_BYTES {
            return Err(ApiError::field("purpose", "`purpose` is too long"));
        }
    }
    String::from_utf8(bytes).map_err(|_| ApiError::field("purpose", "`purpose` is not UTF-8"))
}

/// Appends the field's chunks to `writer` in blocking writes of about `WRITE_CHUNK` bytes.
/// On error the writer is dropped, which removes its temp file.
async fn stream_to_disk(
    field: &mut Field<'_>,
    mut writer: BlobWriter,
    state: &AppState,
) -> Result<BlobWriter, ApiError> {
    let limit = state.max_upload_bytes as u64;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
    loop {
        let chunk = field.chunk().await.map_err(|e| multipart_error(e, state))?;
        let done = chunk.is_none();
        if let Some(c) = chunk {
            buf.extend_from_slice(&c);
        }
        // Over the limit: hand it to the writer now, which refuses it and cleans up.
        let over = writer.written() + buf.len() as u64 > limit;
        if buf.len() >= WRITE_CHUNK || over || (done && !buf.is_empty()) {
            let data = std::mem::take(&mut buf);
            let (w, written) = tokio::task::spawn_blocking(move || {
                let r = writer.write(&data);
                (writer, r)
            })
            .await
            .map_err(|_| StoreError::Interrupted)?;
            writer = w;
            written?;
            buf = Vec::with_capacity(WRITE_CHUNK);
        }
        if done {
            return Ok(writer);
        }
    }
}

/// `limit`, `order`, `after` and `purpose`; anything else is ignored.
fn file_query(params: &[(String, String)]) -> Result<FileQuery, ApiError> {
    let mut q = FileQuery { limit: MAX_LIST_LIMIT, ..FileQuery::default() };
    for (key, value) in params {
        match key.as_str() {
            "purpose" => q.purpose = Some(value.clone()),
            "after" => q.after = Some(value.clone()),
            "limit" => {
                q.limit =
                    value.parse().ok().filter(|n| (1..=MAX_LIST_LIMIT).contains(n)).ok_or_else(
                        || {
                            ApiError::field(
                                "limit",
                                format!("`limit` must be an integer from 1 to {MAX_LIST_LIMIT}"),
                            )
                        },
                    )?
            }
            "order" => {
                q.order = match value.as_str() {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    _ => return Err(ApiError::field("order", "`order` must be `asc` or `desc`")),
                }
            }
            _ => {}
        }
    }
    Ok(q)
}

#[utoipa::path(
    get,
    path = "/v1/files",
    tag = "files",
    params(
        ("purpose" = Option<String>, Query, description = "Only files with this purpose"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000,
         description = "Page size (default 10000)"),
        ("order" = Option<String>, Query, description = "`asc` or `desc` (default) by creation"),
        ("after" = Option<String>, Query, description = "Continue after this file id"),
    ),
    responses(
        (status = 200, description = "A page of files", body = FileList),
        (status = 400, description = "Invalid parameter", body = ErrorResponse),
    )
)]
pub async fn list_files(
    State(state): State<Arc<AppState>>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<FileList>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(None, e.body_text()))?;
    let q = file_query(&params)?;
    let page = state.store.call(move |s| s.list_files(&q)).await?;
    let data: Vec<FileObject> = page.data.iter().map(FileObject::from).collect();
    Ok(Json(FileList {
        object: ListObjectKind::List,
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        data,
        has_more: page.has_more,
    }))
}

fn file_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id).map_err(|e| ApiError::field("file_id", e.body_text()))
}

#[utoipa::path(
    get,
    path = "/v1/files/{id}",
    tag = "files",
    params(("id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 404, description = "Unknown file", body = ErrorResponse),
    )
)]
pub async fn retrieve_file(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let id = file_id(id)?;
    let row = state.store.call(move |s| s.get_file(&id)).await?;
    Ok(Json(FileObject::from(&row)))
}

#[utoipa::path(
    delete,
    path = "/v1/files/{id}",
    tag = "files",
    params(("id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "The file was deleted", body = DeletedFile),
        (status = 404, description = "Unknown file", body = ErrorResponse),
    )
)]
pub async fn delete_file(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeletedFile>, ApiError> {
    let id = file_id(id)?;
    let row = state.store.call(move |s| s.delete_file(&id)).await?;
    tracing::info!(file = %row.id, "file deleted");
    Ok(Json(DeletedFile { id: row.id, object: FileObjectKind::File, deleted: true }))
}

#[utoipa::path(
    get,
    path = "/v1/files/{id}/content",
    tag = "files",
    params(("id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream",
         body = String),
        (status = 404, description = "Unknown file", body = ErrorResponse),
    )
)]
pub async fn file_content(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = file_id(id)?;
    let (file, len) = state
        .store
        .call(move |s| {
            let row = s.get_file(&id)?;
            let path = s.blob_path(&row.blob_path);
            let open = |e| StoreError::io(format!("open {}", path.display()), e);
            let file = std::fs::File::open(&path).map_err(open)?;
            let len = file.metadata().map_err(open)?.len();
            Ok((file, len))
        })
        .await?;
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, len.to_string()),
    ];
    Ok((headers, Body::from_stream(read_chunks(file))).into_response())
}

/// The file's bytes as a stream of blocking reads on the blocking pool. An open file stays
/// readable even if the file is deleted meanwhile.
fn read_chunks(
    file: std::fs::File,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; READ_CHUNK];
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((file, buf))
        })
        .await
        .map_err(std::io::Error::other);
        match read {
            Ok(Ok((_, buf))) if buf.is_empty() => None,
            Ok(Ok((file, buf))) => Some((Ok(Bytes::from(buf)), Some(file))),
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "reading a file's content failed");
                Some((Err(e), None))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<FileQuery, ApiError> {
        let owned: Vec<(String, String)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        file_query(&owned)
    }

    fn param(e: ApiError) -> Option<String> {
        match e {
            ApiError::InvalidRequest { param, .. } => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn query_defaults_and_validation() {
        let d = q(&[]).unwrap();
        assert_eq!((d.limit, d.order, d.after, d.purpose), (10_000, Order::Desc, None, None));
        let x = q(&[("limit", "3"), ("order", "asc"), ("after", "file-1"), ("purpose", "batch")])
            .unwrap();
        assert_eq!(x.limit, 3);
        assert_eq!(x.order, Order::Asc);
        assert_eq!(x.after.as_deref(), Some("file-1"));
        assert_eq!(x.purpose.as_deref(), Some("batch"));
        for bad in ["0", "10001", "-1", "ten"] {
            assert_eq!(param(q(&[("limit", bad)]).unwrap_err()).as_deref(), Some("limit"));
        }
        assert_eq!(param(q(&[("order", "up")]).unwrap_err()).as_deref(), Some("order"));
    }

    #[test]
    fn purposes() {
        assert_eq!(UploadPurpose::parse("fine-tune").unwrap(), UploadPurpose::FineTune);
        assert_eq!(UploadPurpose::parse("user_data").unwrap().as_str(), "user_data");
        for s in ["fine-tune-results", "batch_output", "fine_tune", ""] {
            assert_eq!(param(UploadPurpose::parse(s).unwrap_err()).as_deref(), Some("purpose"));
        }
        // The schema's names match the accepted ones.
        for p in UploadPurpose::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }
}
