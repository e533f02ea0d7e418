//! Changefeeds: the committed changes of a key range, delivered into a sink
//! exactly once, in commit order, whole transactions at a time.
//!
//! A changefeed reads the feed through `kvfeed-client` (so it works against
//! `kvfeed serve` and a TiKV cluster alike), keeps rows in the [`sorter`]
//! until the range's resolved ts passes them, and then hands the sink a
//! window: every row committed in `(checkpoint, resolved]`, sorted by
//! commit ts with each transaction's rows together. When the sink has made
//! the window durable, its end is the new checkpoint. See [`sink`] for the
//! rules that make this exactly once.

#![warn(missing_docs)]

pub mod def;
pub mod error;
pub mod format;
pub mod runner;
pub mod sink;
pub mod sorter;
pub mod staging;
pub mod status;
pub mod verify;

pub use def::{ChangefeedDef, ChangefeedId, Format, Mode};
pub use error::{ChangefeedError, DefError, SorterError};
pub use runner::{Changefeed, RunOptions};
pub use sink::{AnySink, Sink, SinkError, SinkUri};
pub use sorter::Sorter;
pub use status::{State, Status};
