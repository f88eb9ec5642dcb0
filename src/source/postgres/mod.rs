//! PostgreSQL source backend: trigger-based change tracking.
