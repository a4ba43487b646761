//! Stop-string matching over streamed text; the stop text itself is never emitted.
