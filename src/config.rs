//! ServerConfig from flags and COSERVE_* environment variables.
