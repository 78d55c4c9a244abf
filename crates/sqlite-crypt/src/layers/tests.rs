//! Unit tests of the layers.
