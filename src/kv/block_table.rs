//! Per-sequence block table and slot mapping.
