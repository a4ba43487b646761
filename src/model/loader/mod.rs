//! Model loading from GGUF files and Hugging Face directories.
