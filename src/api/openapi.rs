//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! request/response types. `openapi/openapi.json` holds a copy checked by `tests/api/openapi.rs`.

use utoipa::OpenApi;

use super::{
    chat, completions, error, files, fine_tuning, generation, health, logprobs, models, sampling,
};
use crate::finetune::job_object;

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
        models::delete_model,
        files::upload_file,
        files::list_files,
        files::retrieve_file,
        files::delete_file,
        files::file_content,
        fine_tuning::create_job,
        fine_tuning::list_jobs,
        fine_tuning::retrieve_job,
        fine_tuning::cancel_job,
        fine_tuning::pause_job,
        fine_tuning::resume_job,
        fine_tuning::list_events,
        fine_tuning::list_checkpoints,
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
        models::DeletedModel,
        files::CreateFileRequest,
        files::UploadPurpose,
        files::FileObject,
        files::FileList,
        files::DeletedFile,
        fine_tuning::CreateJobRequest,
        fine_tuning::MethodRequest,
        fine_tuning::SupervisedRequest,
        fine_tuning::LoraRequest,
        fine_tuning::JobList,
        fine_tuning::EventList,
        fine_tuning::CheckpointList,
        job_object::FineTuningJob,
        job_object::RequestedHyperparameters,
        job_object::Hyperparameters,
        job_object::JobError,
        job_object::JobStatus,
        job_object::Method,
        job_object::SupervisedMethod,
        job_object::JobEventObject,
        job_object::CheckpointObject,
        health::Version,
    )),
    tags(
        (name = "completions", description = "Text completions"),
        (name = "chat", description = "Chat completions"),
        (name = "models", description = "Served models"),
        (name = "files", description = "Uploaded files (training data) and job results"),
        (name = "fine-tuning", description = "Fine-tuning jobs, their events and checkpoints"),
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
