// With the `wasmedge` feature this binary links libwasmedge too (the in-process mode runs the
// engine itself): the same run path as the worker's, from the worker's own build script.
include!("../../worker/build.rs");
