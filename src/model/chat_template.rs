//! Chat templates (Jinja) rendered with minijinja.
