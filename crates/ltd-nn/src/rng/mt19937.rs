//! The Mersenne Twister as PyTorch's CPU generator runs it (`at::mt19937`,
//! `aten/src/ATen/core/MT19937RNGEngine.h`): Matsumoto and Nishimura's MT19937 with the 2002
//! `init_genrand` seeding from the low 32 bits of a 64-bit seed, and torch's lazy twist (the state
//! is regenerated on the draw that finds `left` at zero, not on seeding).

/// Words of MT19937 state.
pub(crate) const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The engine, field for field as torch's `mt19937_data_pod` (what `get_state` serialises).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Mt19937 {
    /// The 64-bit seed as given (only its low 32 bits enter the state).
    pub(crate) seed: u64,
    /// Draws left before the next twist, plus one (torch's `left_`, 1..=624).
    pub(crate) left: i32,
    /// Index of the next state word to temper (torch's `next_`, 0..=624).
    pub(crate) next: u32,
    pub(crate) state: [u32; N],
}

impl Mt19937 {
    /// `at::mt19937(seed)`.
    pub(crate) fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        // Truncation is torch's: seeds equal modulo 2^32 give the same stream.
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { seed, left: 1, next: 0, state }
    }

    /// Whether the fields describe a state torch would accept (`mt19937_engine::is_valid`).
    pub(crate) fn is_valid(&self) -> bool {
        self.left > 0 && self.left as usize <= N && self.next as usize <= N
    }

    /// The next 32 random bits (`mt19937_engine::operator()`).
    pub(crate) fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.twist();
        }
        let mut y = self.state[self.next as usize];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        let mix = |u: u32, v: u32| {
            let y = (u & UPPER_MASK) | (v & LOWER_MASK);
            (y >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
        };
        for i in 0..N - M {
            s[i] = s[i + M] ^ mix(s[i], s[i + 1]);
        }
        for i in N - M..N - 1 {
            s[i] = s[i + M - N] ^ mix(s[i], s[i + 1]);
        }
        s[N - 1] = s[M - 1] ^ mix(s[N - 1], s[0]);
        self.left = N as i32;
        self.next = 0;
    }
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("seed", &self.seed)
            .field("left", &self.left)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_mt19937() {
        // The 10000th output of MT19937 seeded with 5489 is 4123659995 (C++11 [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }
}
