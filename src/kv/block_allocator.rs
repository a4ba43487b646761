//! Free list of KV blocks; allocations return their blocks on Drop.
