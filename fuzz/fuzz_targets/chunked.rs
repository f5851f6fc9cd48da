//! The chunked decoder: never panics, and gives the same answer however its input is
//! split into pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::h1::chunked::{Decoder, Error};

/// Decodes `input` in pieces cut at `cuts`: the data, the bytes used, or the error.
fn decode(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool), Error> {
    let mut d = Decoder::new();
    let mut data = Vec::new();
    let mut at = 0;
    let mut ends = cuts.iter().copied().filter(|c| *c < input.len()).chain([input.len()]);
    let mut end = ends.next().unwrap_or(input.len());
    loop {
        let step = d.step(&input[at..end.max(at)])?;
        data.extend_from_slice(&input[at..][step.data.clone()]);
        at += step.consumed;
        if step.done {
            break;
        }
        if at >= end {
            match ends.next() {
                Some(e) => end = e,
                None => break,
            }
        }
    }
    assert_eq!(d.data_len(), data.len() as u64);
    Ok((data, at, d.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else { return };
    let whole = decode(input, &[]);
    let step = usize::from(seed % 7) + 1;
    let cuts: Vec<usize> = (1..input.len()).step_by(step).collect();
    let pieces = decode(input, &cuts);
    assert_eq!(whole, pieces);
});
