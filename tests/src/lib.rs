//! Testbed: see README.
