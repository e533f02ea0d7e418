//! INTERFACE STUB — to be implemented.
