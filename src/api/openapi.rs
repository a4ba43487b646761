//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! request/response types. `openapi/openapi.json` holds a copy checked by `tests/openapi.rs`.

use utoipa::OpenApi;

use super::{chat, completions, error, files, generation, health, logprobs, models, sampling};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "coserve",
        description = "OpenAI-compatible inference server that co-serves LoRA fine-tuning."
    ),
    paths(
        completions::create_completion,
        chat::create_chat_completion,
        models::list_models,
        models::retrieve_model,
        files::upload_file,
        files::list_files,
        files::retrieve_file,
        files::delete_file,
        files::file_content,
        health::health,
        health::version,
        health::metrics,
        health::openapi_json,
    ),
    components(schemas(
        error::ErrorResponse,
        error::ErrorBody,
        generation::Usage,
        generation::Finish,
        sampling::Stop,
        sampling::StreamOptions,
        logprobs::CompletionLogprobs,
        logprobs::ChatLogprobs,
        logprobs::ChatTokenLogprob,
        logprobs::TopLogprob,
        completions::Prompt,
        completions::CompletionRequest,
        completions::CompletionResponse,
        completions::CompletionChoice,
        chat::ChatCompletionRequest,
        chat::RequestMessage,
        chat::MessageContent,
        chat::ContentPart,
        chat::ChatCompletionResponse,
        chat::ChatChoice,
        chat::ResponseMessage,
        chat::ChatCompletionChunk,
        chat::ChatChunkChoice,
        chat::ChatDelta,
        models::ModelList,
        models::ModelObject,
        files::CreateFileRequest,
        files::UploadPurpose,
        files::FileObject,
        files::FileList,
        files::DeletedFile,
        health::Version,
    )),
    tags(
        (name = "completions", description = "Text completions"),
        (name = "chat", description = "Chat completions"),
        (name = "models", description = "Served models"),
        (name = "files", description = "Uploaded files (training data) and job results"),
        (name = "server", description = "Health, version, metrics and this document"),
    )
)]
struct ApiDoc;

pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON with a trailing newline (the form kept in the repository).
pub fn spec_json() -> Result<String, serde_json::Error> {
    let mut json = serde_json::to_string_pretty(&openapi())?;
    json.push('\n');
    Ok(json)
}
