//! Choosing which pages are cold.

pub mod clock;
