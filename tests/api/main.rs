//! The HTTP API over real HTTP on 127.0.0.1: completions, chat, files, fine-tuning jobs, errors,
//! the official `openai` client and the published OpenAPI document.

#[path = "../common/mod.rs"]
mod common;

mod chat;
mod completions;
mod errors;
mod files;
mod fine_tuning;
mod misc;
mod openai_client;
mod openapi;
mod support;
