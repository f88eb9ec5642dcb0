//! The reference receiver: an HTTP service writing mirrors into PostgreSQL.
