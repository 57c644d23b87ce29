//! Reading choices out of the fuzz input, and cutting input into pieces.

/// The input as a stream of choices followed by payload.
pub(crate) struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data }
    }

    /// The next octet, 0 once the input is used up.
    pub(crate) fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&first, rest)) => {
                self.data = rest;
                first
            }
            None => 0,
        }
    }

    /// Up to `n` octets.
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Everything up to the next LF (excluded), or the rest.
    pub(crate) fn line(&mut self) -> &'a [u8] {
        match self.data.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let line = &self.data[..lf];
                self.data = &self.data[lf + 1..];
                line
            }
            None => self.take(self.data.len()),
        }
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// xorshift64*: split points and other choices that must follow from the input alone.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `1..=max`.
    pub(crate) fn between_1_and(&mut self, max: usize) -> usize {
        1 + (self.next() % max.max(1) as u64) as usize
    }
}

/// How to cut an input into the pieces that one read after another would deliver.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Split {
    Whole,
    EveryByte,
    /// Pieces of random length up to the given maximum, from a seed.
    Random {
        seed: u64,
        max: usize,
    },
}

impl Split {
    /// The ways of cutting that an oracle comparing splits tries, the seed picking the random
    /// ones.
    pub(crate) fn all(seed: u64) -> [Split; 4] {
        [
            Split::Whole,
            Split::EveryByte,
            Split::Random { seed, max: 7 },
            Split::Random { seed: seed ^ 0x5555, max: 300 },
        ]
    }

    /// One way of cutting, chosen by an octet of the input.
    pub(crate) fn choose(choice: u8) -> Split {
        match choice % 4 {
            0 => Split::Whole,
            1 => Split::EveryByte,
            2 => Split::Random { seed: u64::from(choice), max: 16 },
            _ => Split::Random { seed: u64::from(choice), max: 700 },
        }
    }

    /// The pieces of `data`, in order, covering all of it.
    pub(crate) fn pieces(self, data: &[u8]) -> Vec<&[u8]> {
        let mut pieces = Vec::new();
        let mut rest = data;
        let mut rng = match self {
            Split::Random { seed, .. } => Some(Rng::new(seed ^ data.len() as u64)),
            _ => None,
        };
        while !rest.is_empty() {
            let n = match self {
                Split::Whole => rest.len(),
                Split::EveryByte => 1,
                Split::Random { max, .. } => {
                    rng.as_mut().map_or(1, |rng| rng.between_1_and(max)).min(rest.len())
                }
            };
            let (piece, tail) = rest.split_at(n);
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }
}

/// Position of the first occurrence of `needle` in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}
