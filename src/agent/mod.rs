//! The agent: drives mirroring cycles from a source to a partner receiver.
