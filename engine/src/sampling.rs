//! Choosing the next token from logits: greedy, or temperature with top-k / top-p / min-p
//! filtering, reproducible under a seed (ChaCha8, so the same seed gives the same tokens on every
//! machine); before either, OpenAI's logit bias and presence / frequency penalties and vLLM's
//! repetition penalty, in vLLM's order.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

/// Sampling parameters (OpenAI / vLLM meanings).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy, and so does anything below [`GREEDY_BELOW`] (as in vLLM).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop the tokens less likely than `min_p` times the most likely one (0 = off; vLLM).
    pub min_p: f32,
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token the output holds (OpenAI, in [-2, 2]).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the output holds it (OpenAI, in [-2, 2]).
    pub frequency_penalty: f32,
    /// A token of the prompt or the output has a positive logit divided by it, a negative one
    /// multiplied (vLLM / transformers; 1 = off).
    pub repetition_penalty: f32,
    /// Added to these tokens' logits (OpenAI's `logit_bias`, each in [-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
}

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`): dividing logits by a
/// smaller one only turns the most likely token's probability into 1 after float rounding, or,
/// near 0, overflows.
pub const GREEDY_BELOW: f32 = 1e-5;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks the ranges, naming the parameter at fault.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::input(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(EngineError::input(format!(
                "min_p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(EngineError::input(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(EngineError::input(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|b| !(-100.0..=100.0).contains(&b.1))
        {
            return Err(EngineError::input(format!(
                "logit_bias for token {token} must be in [-100, 100], got {bias}"
            )));
        }
        Ok(())
    }
}

/// The probability of a token and of the most likely alternatives (for `logprobs`).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A sampler for one sequence (owns its random stream, and what the penalties count: the
/// tokens it has picked, and the prompt's).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token was picked (the output so far).
    picked: HashMap<u32, u32>,
    /// The prompt's and the output's tokens, kept only for a repetition penalty.
    seen: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Self {
            params,
            rng,
            picked: HashMap::new(),
            seen: HashSet::new(),
        }
    }

    /// The sampler for a sequence starting with `prompt` (which a repetition penalty counts).
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.seen.extend(prompt);
        }
        self
    }

    /// Picks the next token; the tokens of `suppress` cannot be picked (vLLM's `min_tokens`
    /// holds the stop tokens back this way).
    pub fn sample(&mut self, logits: &[f32], suppress: &[u32]) -> u32 {
        let logits = self.processed(logits, suppress);
        let token = self.pick(&logits);
        *self.picked.entry(token).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        token
    }

    /// The logits after suppression, logit bias and the penalties (vLLM's order); borrowed
    /// when none applies.
    fn processed<'l>(&self, logits: &'l [f32], suppress: &[u32]) -> Cow<'l, [f32]> {
        let p = &self.params;
        let penalised =
            p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || p.repetition_penalty != 1.0;
        if suppress.is_empty() && p.logit_bias.is_empty() && !penalised {
            return Cow::Borrowed(logits);
        }
        let mut out = logits.to_vec();
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = out.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &token in &self.seen {
                if let Some(l) = out.get_mut(token as usize)
                    && l.is_finite()
                {
                    // Kept finite: a tiny penalty would make a seen token's logit infinite,
                    // which would then take all the probability from every other token.
                    let penalised = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                    *l = penalised.clamp(f32::MIN, f32::MAX);
                }
            }
        }
        for (&token, &count) in &self.picked {
            if let Some(l) = out.get_mut(token as usize) {
                *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
        for &token in suppress {
            if let Some(l) = out.get_mut(token as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        Cow::Owned(out)
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature < GREEDY_BELOW {
            return argmax(logits);
        }
        let unfiltered = p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0;
        let top = largest(logits, |l| !l.is_nan());
        if unfiltered && top < f32::INFINITY {
            // Every finite logit may be drawn: from the weights as they lie, no list made.
            let u = self.rng.random::<f64>();
            let token = WEIGHTS.with_borrow_mut(|weights| {
                weights_of(logits, top, p.temperature, weights);
                draw_dense(weights, u)
            });
            return token.unwrap_or_else(|| argmax(logits));
        }
        let kept = self.kept_below(logits, top);
        let u = self.rng.random::<f64>();
        draw(&kept, u).unwrap_or_else(|| argmax(logits))
    }

    /// The tokens that may be picked, each with its weight (its probability up to a common
    /// factor; the most likely token's is 1): the finite logits at the temperature, then top-k,
    /// min-p and top-p (vLLM's order). `O(vocabulary)`: only top-k's survivors and top-p's
    /// nucleus are ever sorted, never the whole vocabulary (129,280 tokens on DeepSeek's, for
    /// every token of every sequence).
    /// `top` is the row's largest logit other than NaN.
    fn kept_below(&self, logits: &[f32], top: f32) -> Vec<(u32, f32)> {
        let p = &self.params;
        if top == f32::INFINITY {
            // Every other token's probability is 0 next to an infinite logit: the infinite
            // ones share it (an overflow in the model's last product, say), whatever the
            // filters, which cannot tell them apart.
            let infinite = logits.iter().enumerate().filter(|(_, l)| **l == top);
            return infinite.map(|(i, _)| (i as u32, 1.0)).collect();
        }
        WEIGHTS.with_borrow_mut(|weights| {
            weights_of(logits, top, p.temperature, weights);
            // A finite logit's weight is above 0 (at least 2^-126), a non-finite one's 0.
            let at_least = |min: f32| {
                let tokens = weights.iter().enumerate();
                tokens
                    .filter(move |&(_, &w)| w > 0.0 && w >= min)
                    .map(|(i, &w)| (i as u32, w))
            };
            if p.top_k == 0 && p.min_p <= 0.0 {
                // top-p alone (or nothing): straight from the weights, listing only the
                // nucleus.
                return match p.top_p < 1.0 {
                    true => nucleus(at_least(0.0), p.top_p),
                    false => at_least(0.0).collect(),
                };
            }
            // min-p keeps the tokens of at least min_p of the most likely one's weight (1,
            // which always stays); without top-k first, only those are listed.
            let min_p = p.min_p.min(1.0);
            let mut kept: Vec<(u32, f32)> = match p.top_k {
                0 => at_least(min_p).collect(),
                _ => at_least(0.0).collect(),
            };
            if p.top_k > 0 && p.top_k < kept.len() {
                kept.select_nth_unstable_by(p.top_k - 1, likelier);
                kept.truncate(p.top_k);
                // In a defined order, so a seed draws the same token whatever order the
                // selection left (the standard library does not promise one).
                kept.sort_unstable_by(likelier);
            }
            if p.min_p > 0.0 {
                kept.retain(|&(_, w)| w >= min_p);
            }
            match p.top_p < 1.0 {
                true => nucleus(kept.into_iter(), p.top_p),
                false => kept,
            }
        })
    }
}

#[cfg(test)]
impl Sampler {
    /// [`Sampler::kept_below`] for the row's own largest logit.
    fn kept(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        self.kept_below(logits, largest(logits, |l| !l.is_nan()))
    }
}

/// More likely first; the lower id first among equals.
fn likelier(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The nucleus of `tokens` (id and weight each): the fewest most likely tokens whose weight
/// reaches `top_p` of the whole. It lies within the tokens down to some power-of-two weight
/// band: two passes find the band where the mass, from the top, reaches top_p (the weights
/// binned by their float exponent); every token above that band is in the nucleus, in
/// whatever order, and only the band's tokens are sorted, to find where it ends. So only the
/// nucleus is listed, and at most one band of it sorted, however long the tail (but where the
/// sums' rounding puts the end just outside the band found: then every token is sorted).
fn nucleus<I>(tokens: I, top_p: f32) -> Vec<(u32, f32)>
where
    I: Iterator<Item = (u32, f32)> + Clone,
{
    let need = f64::from(top_p) * tokens.clone().map(|(_, w)| f64::from(w)).sum::<f64>();
    let mut mass = [0f64; 256];
    for (_, w) in tokens.clone() {
        mass[(w.to_bits() >> 23) as usize & 255] += f64::from(w);
    }
    let mut cumulative = 0.0;
    let band = (0..256)
        .rev()
        .find(|&b| {
            cumulative += mass[b];
            cumulative >= need
        })
        .unwrap_or(0);
    let floor = f32::from_bits((band as u32) << 23);
    let ceiling = f32::from_bits((band as u32 + 1) << 23);
    let (mut nucleus, mut edge) = (Vec::new(), Vec::new());
    for (token, w) in tokens.clone().filter(|&(_, w)| w >= floor) {
        match w >= ceiling {
            true => nucleus.push((token, w)),
            false => edge.push((token, w)),
        }
    }
    let above: f64 = nucleus.iter().map(|&(_, w)| f64::from(w)).sum();
    if above < need
        && let Some(end) = prefix_reaching(&mut edge, need - above, likelier)
    {
        nucleus.extend_from_slice(&edge[..end]);
        return nucleus;
    }
    // Summed in another order, the bands' mass reached top_p a rounding sooner or later than
    // these tokens do: the nucleus ends above the band or goes on below it. Sort them all.
    let mut all: Vec<(u32, f32)> = tokens.collect();
    let end = prefix_reaching(&mut all, need, likelier);
    all.truncate(end.unwrap_or(all.len()));
    all
}

thread_local! {
    /// Each thread's room for a row's weights (a sampling thread reuses it for every token).
    static WEIGHTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Each logit's weight at `temperature` into `weights` (its probability up to a common factor:
/// the largest finite logit's is 1, a non-finite logit's 0), scaled from the largest logit
/// down, so that no weight overflows. `top` is the row's largest logit other than NaN, which
/// must not be +inf (it is then the largest finite one, or -inf when there is none). One pass
/// of [`exp_nonpositive`], which the compiler vectorises (the standard library's `exp` is a
/// call a value).
fn weights_of(logits: &[f32], top: f32, temperature: f32, weights: &mut Vec<f32>) {
    debug_assert!(top < f32::INFINITY);
    let inverse = 1.0 / temperature;
    weights.clear();
    weights.extend(logits.iter().map(|&l| {
        let w = exp_nonpositive((l - top) * inverse);
        if l.is_finite() { w } else { 0.0 }
    }));
}

/// e^x for x ≤ 0, within 3e-7 relative of the exact value on [-87, 0], with no branch and no
/// call, so that a loop of it runs as vector instructions: x = n·ln 2 + r with |r| ≤ ln 2 / 2,
/// e^r by its Taylor polynomial to r^6, and 2^n by the exponent bits. The same bits on every
/// machine (plain float arithmetic, no library `exp`). Below -87 (-inf too) it gives e^-87,
/// about 1.6e-38: a finite logit's weight never reaches 0, though a probability that small
/// (the whole vocabulary's tail together below 1e-32) is never drawn in practice. NaN gives
/// NaN.
fn exp_nonpositive(x: f32) -> f32 {
    // Round to nearest by adding and removing 1.5 · 2^23 (`round` is a call on baseline x86).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 in two parts, so that n · ln 2 is subtracted without losing r's bits.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n + 127 is in [1, 127]: it sits in the low mantissa bits of 2^23 + 127 + n.
    let scale = f32::from_bits(((n + 8_388_735.0).to_bits() & 0xff) << 23);
    p * scale
}

/// The token at fraction `u` (in [0, 1)) of the total of `weights` (one a token, in token
/// order, 0 for a token that cannot be drawn); `None` when all are 0. Summed in f64, the total
/// in eight running sums (which vectorise), the search from the first token.
fn draw_dense(weights: &[f32], u: f64) -> Option<u32> {
    let mut sums = [0f64; 8];
    let chunks = weights.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&w| f64::from(w)).sum();
    for chunk in chunks {
        for (sum, &w) in sums.iter_mut().zip(chunk) {
            *sum += f64::from(w);
        }
    }
    let total = sums.iter().sum::<f64>() + tail;
    if total <= 0.0 || total.is_nan() {
        return None;
    }
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last = None;
    for (token, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cumulative += f64::from(w);
            last = Some(token as u32);
            if target < cumulative {
                return last;
            }
        }
    }
    // Summed in another order, the running total can end a rounding short of `target`.
    last
}

/// The token at fraction `u` (in [0, 1)) of the weight of `kept`, in their order; `None` when
/// there is none. Summed in f64: in f32 a long tail of weights each below half a step of the
/// total (e^-17 next to a top token's 1) would add nothing, and could never be drawn.
fn draw(kept: &[(u32, f32)], u: f64) -> Option<u32> {
    let total: f64 = kept.iter().map(|&(_, w)| f64::from(w)).sum();
    let target = u * total;
    let mut cumulative = 0.0;
    for &(token, weight) in kept {
        cumulative += f64::from(weight);
        if target < cumulative {
            return Some(token);
        }
    }
    kept.last().map(|&(token, _)| token)
}

/// Sorts `tokens` by `order` and gives how many of them, from the first, reach weight `need`.
fn prefix_reaching(
    tokens: &mut [(u32, f32)],
    need: f64,
    order: impl Fn(&(u32, f32), &(u32, f32)) -> std::cmp::Ordering,
) -> Option<usize> {
    tokens.sort_unstable_by(order);
    let mut cumulative = 0.0;
    tokens
        .iter()
        .position(|&(_, w)| {
            cumulative += f64::from(w);
            cumulative >= need
        })
        .map(|i| i + 1)
}

/// Index of the largest logit (lowest index on ties; NaN never wins, and an all-NaN or empty
/// row gives 0).
pub fn argmax(logits: &[f32]) -> u32 {
    let top = largest(logits, |l| !l.is_nan());
    logits.iter().position(|&l| l == top).unwrap_or(0) as u32
}

/// The largest of `values` that `admit` lets in (-inf when none). In eight lanes of selects,
/// which the compiler turns into vector compares and blends, where a fold of `f32::max`
/// (NaN-aware) runs a value at a time.
fn largest(values: &[f32], admit: impl Fn(f32) -> bool) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            let v = if admit(v) { v } else { f32::NEG_INFINITY };
            *lane = if v > *lane { v } else { *lane };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .copied()
        .filter(|&v| admit(v))
        .fold(f32::NEG_INFINITY, |top, v| if v > top { v } else { top })
}

/// The lowest log-probability reported: an impossible token's (a `-inf` or NaN logit, or any
/// token beside a `+inf` one), which JSON cannot carry as `-inf`; vLLM reports the same.
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// Log-probability of `token` and the `top` most likely tokens, under the unscaled logits, as
/// the sampler sees them: a NaN logit has probability 0, and `+inf` logits share all of it.
/// Never below [`LOGPROB_FLOOR`] nor NaN.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = largest(logits, |l| !l.is_nan());
    // What a +inf logit gets, and what a finite one's log-probability subtracts from it: with
    // a +inf logit, every finite one's is -inf (floored).
    let (inf_share, log_sum) = if max == f32::INFINITY {
        let count = logits.iter().filter(|&&l| l == f32::INFINITY).count();
        (0.0 - (count as f32).ln(), f32::INFINITY) // 0, not -0, for a single one
    } else if max == f32::NEG_INFINITY {
        (LOGPROB_FLOOR, f32::INFINITY) // nothing is possible: an empty or all -inf / NaN row
    } else {
        // In float64: summed in float32, once the total nears 1 every term below 6e-8 is
        // lost, and a long tail of them with it, depending on where in the row it lies.
        let sum: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| f64::from(l - max).exp())
            .sum();
        (LOGPROB_FLOOR, sum.ln() as f32 + max)
    };
    let log_prob = |l: f32| {
        if l == f32::INFINITY {
            inf_share
        } else if l.is_nan() {
            LOGPROB_FLOOR
        } else {
            (l - log_sum).max(LOGPROB_FLOOR)
        }
    };
    let lp = |t: u32| log_prob(logits[t as usize]);
    let top = top.min(logits.len());
    let mut order: Vec<u32> = match top {
        0 => Vec::new(),
        _ => (0..logits.len() as u32).collect(),
    };
    if top > 0 {
        // By logit, a NaN one last (total_cmp would rank it above +inf; as a negative NaN it
        // ranks below -inf), ties by token id.
        let key = |t: u32| {
            let l = logits[t as usize];
            if l.is_nan() { -f32::NAN } else { l }
        };
        let rank = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
        order.select_nth_unstable_by(top - 1, rank);
        order.truncate(top);
        order.sort_unstable_by(rank);
    }
    TokenLogprob {
        token,
        logprob: lp(token),
        top: order.into_iter().map(|t| (t, lp(t))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `logprobs: 0` (and chat's `logprobs: true` alone) asks for the token's log-probability
    /// and no alternatives, not the whole vocabulary.
    #[test]
    fn logprobs_list_exactly_the_alternatives_asked_for() {
        let logits = [0.5, 2.0, -1.0, 1.0];
        for top in [0, 1, 3, 4, 9] {
            let lp = logprobs(&logits, 2, top);
            assert_eq!(lp.top.len(), top.min(logits.len()), "top {top}");
            let ids: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
            assert_eq!(ids, [1, 3, 0, 2][..top.min(4)], "top {top}: by logit");
            assert_eq!(lp.token, 2);
            assert!((lp.logprob - lp.top.get(3).map_or(lp.logprob, |t| t.1)).abs() < 1e-6);
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], &[]), 1);
    }

    #[test]
    fn tiny_temperatures_and_penalties_stay_sensible() {
        // Below GREEDY_BELOW: the argmax, not the NaN probabilities of logits divided into
        // infinities (which picked the least likely token).
        let logits = [1.0, 3.0, -2.0, 0.5];
        for temperature in [1e-40, 1e-30, 1e-6] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                seed: Some(3),
                ..Default::default()
            });
            assert!(
                (0..10).all(|_| s.sample(&logits, &[]) == 1),
                "{temperature}"
            );
        }
        // Just above it, with logits far apart: still finite probabilities, so the top token.
        let mut s = Sampler::new(SamplingParams {
            temperature: 2e-5,
            seed: Some(3),
            ..Default::default()
        });
        assert_eq!(s.sample(&[1e30, 3e30, -1e30], &[]), 1);
        // A tiny repetition penalty raises a seen positive logit to f32::MAX (not to +inf),
        // so greedy picks it.
        let tiny = SamplingParams {
            repetition_penalty: 1e-39,
            ..Default::default()
        };
        assert_eq!(greedy_run(tiny.clone(), &[0], &[0.5, 2.0], 1), [0]);
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(5),
            ..tiny
        })
        .with_prompt(&[0]);
        assert!((0..10).all(|_| s.sample(&[0.5, 2.0], &[]) == 0));
    }

    #[test]
    fn a_seed_reproduces_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run());
        assert!(
            first.iter().any(|&t| t != first[0]),
            "sampling at temperature 1 should vary"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -1.0, -2.0];
        let mut top_k = Sampler::new(SamplingParams {
            top_k: 2,
            seed: Some(1),
            ..Default::default()
        });
        let mut top_p = Sampler::new(SamplingParams {
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(top_k.sample(&logits, &[]) < 2);
            assert_eq!(top_p.sample(&logits, &[]), 0, "p(token 0) > 0.5 alone");
        }
    }

    /// The tokens and weights a full sort keeps (the way the sampler kept them before it
    /// stopped sorting the vocabulary), from the same weights the sampler computes.
    fn kept_by_sorting(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f32)> {
        let top = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut c: Vec<(u32, f32)> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .map(|i| {
                let w = exp_nonpositive((logits[i] - top) * (1.0 / p.temperature));
                (i as u32, w)
            })
            .collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        if p.min_p > 0.0 {
            let keep = c.iter().position(|x| x.1 < p.min_p).unwrap_or(c.len());
            c.truncate(keep.max(1));
        }
        if p.top_p < 1.0 {
            let total: f64 = c.iter().map(|x| f64::from(x.1)).sum();
            let mut cumulative = 0.0;
            let keep = c.iter().position(|x| {
                cumulative += f64::from(x.1);
                cumulative >= f64::from(p.top_p) * total
            });
            c.truncate(keep.map_or(c.len(), |i| i + 1));
        }
        c
    }

    #[test]
    fn the_kept_tokens_are_those_a_full_sort_keeps() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut cases = 0;
        for vocab in [1usize, 7, 1000, 5000] {
            for _ in 0..60 {
                let spread = [0.5f32, 3.0, 12.0][rng.random_range(0..3)];
                let logits: Vec<f32> = (0..vocab)
                    .map(|_| match rng.random_range(0..50) {
                        0 => f32::NEG_INFINITY,
                        _ => rng.random_range(-spread..spread),
                    })
                    .collect();
                let params = SamplingParams {
                    temperature: [0.3f32, 1.0, 2.5][rng.random_range(0..3)],
                    top_k: [0, 1, 5, 50, vocab + 3][rng.random_range(0..5)],
                    top_p: [1.0f32, 0.95, 0.5, 0.01][rng.random_range(0..4)],
                    min_p: [0.0f32, 0.05, 0.5][rng.random_range(0..3)],
                    ..Default::default()
                };
                let mut kept = Sampler::new(params.clone()).kept(&logits);
                kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let reference = kept_by_sorting(&params, &logits);
                assert_eq!(kept, reference, "{params:?}");
                assert!(!kept.is_empty() || logits.iter().all(|l| !l.is_finite()));
                cases += 1;
            }
        }
        assert_eq!(cases, 240);
    }

    #[test]
    fn the_vectorised_exponential_is_within_3e_7_of_exp() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (want, got) = (f64::from(x).exp(), f64::from(exp_nonpositive(x)));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst:.2e}");
        // Below -87, e^-87: never 0, never more.
        assert_eq!(exp_nonpositive(-1e4), exp_nonpositive(-87.0));
        assert!(exp_nonpositive(f32::NEG_INFINITY) > 0.0);
        assert_eq!(
            exp_nonpositive(0.0),
            1.0,
            "the top token's weight is exactly 1"
        );
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn a_dense_draw_follows_the_weights() {
        // Tokens 1 and 4 cannot be drawn (weight 0); the others in proportion 2 : 6 : 1 : 1.
        let weights = [2.0f32, 0.0, 6.0, 1.0, 0.0, 1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut seen = [0u32; 6];
        let draws = 50_000;
        for _ in 0..draws {
            seen[draw_dense(&weights, rng.random::<f64>()).unwrap() as usize] += 1;
        }
        assert_eq!((seen[1], seen[4]), (0, 0), "{seen:?}");
        for (token, share) in [(0, 0.2), (2, 0.6), (3, 0.1), (5, 0.1)] {
            let got = f64::from(seen[token]) / f64::from(draws);
            assert!(
                (got - share).abs() < 0.01,
                "token {token}: {got} of draws, want {share}"
            );
        }
        // The ends: the first token at 0, the last drawable one just below 1, and none at all.
        assert_eq!(draw_dense(&weights, 0.0), Some(0));
        assert_eq!(draw_dense(&weights, 1.0 - 1e-16), Some(5));
        assert_eq!(draw_dense(&[0.0; 9], 0.5), None);
        // A row long enough for the eight running sums: the middle of each token's share of
        // the total draws that token, and never one of weight 0.
        let row: Vec<f32> = (0..1003)
            .map(|i| match rng.random_range(0..5) {
                0 => 0.0,
                _ => rng.random_range(0.0f32..1.0) * if i % 97 == 0 { 1e3 } else { 1.0 },
            })
            .collect();
        let total: f64 = row.iter().map(|&w| f64::from(w)).sum();
        let mut before = 0.0;
        for (token, &w) in row.iter().enumerate() {
            if w > 0.0 {
                let u = (before + f64::from(w) / 2.0) / total;
                assert_eq!(draw_dense(&row, u), Some(token as u32), "u {u}");
                before += f64::from(w);
            }
        }
    }

    #[test]
    fn the_vector_max_and_argmax_agree_with_a_plain_scan() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for len in [0usize, 1, 7, 8, 9, 63, 1000] {
            for _ in 0..50 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match rng.random_range(0..12) {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 if rng.random_range(0..4) == 0 => f32::INFINITY,
                        3 => 1.5, // ties
                        _ => rng.random_range(-3.0f32..3.0),
                    })
                    .collect();
                // Lowest index among the largest; NaN never; 0 when nothing but NaN.
                let mut want: Option<usize> = None;
                for (i, &l) in row.iter().enumerate() {
                    if !l.is_nan() && want.is_none_or(|b| l > row[b]) {
                        want = Some(i);
                    }
                }
                assert_eq!(argmax(&row) as usize, want.unwrap_or(0), "{row:?}");
                let finite = row.iter().copied().filter(|l| l.is_finite());
                let top = finite.fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(largest(&row, f32::is_finite), top, "{row:?}");
            }
        }
    }

    #[test]
    fn infinite_logits_take_all_the_probability() {
        // Two +inf among numbers (and a NaN): only they are drawn, both of them, under every
        // filter; greedy takes the first. Without one, -inf and NaN are never drawn.
        let logits = [1.0, f32::INFINITY, 30.0, f32::NAN, f32::INFINITY, -2.0];
        for (top_k, top_p, min_p) in [(0, 1.0, 0.0), (1, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.9)] {
            let mut s = Sampler::new(SamplingParams {
                top_k,
                top_p,
                min_p,
                seed: Some(4),
                ..Default::default()
            });
            let mut seen = [0; 6];
            for _ in 0..200 {
                seen[s.sample(&logits, &[]) as usize] += 1;
            }
            assert_eq!(seen[0] + seen[2] + seen[3] + seen[5], 0, "{seen:?}");
            assert!(seen[1] > 50 && seen[4] > 50, "{seen:?}");
        }
        assert_eq!(
            Sampler::new(SamplingParams::greedy()).sample(&logits, &[]),
            1
        );
        let mut s = Sampler::new(SamplingParams {
            seed: Some(4),
            ..Default::default()
        });
        let logits = [f32::NEG_INFINITY, 0.5, f32::NAN, 0.0];
        for _ in 0..100 {
            assert!([1, 3].contains(&s.sample(&logits, &[])));
        }
    }

    #[test]
    fn a_long_tail_of_small_weights_keeps_its_mass_wherever_its_ids_are() {
        // One token at 0 and 129,279 at -17: each tail weight (e^-17) is below half an f32
        // step of the total, yet the tail holds about 0.53% of the probability.
        let vocab = 129_280;
        let tail = (vocab - 1) as f64 * (-17f64).exp();
        let share = tail / (1.0 + tail);
        let sampler = Sampler::new(SamplingParams::default());
        for top in [0, vocab - 1] {
            let mut logits = vec![-17f32; vocab];
            logits[top] = 0.0;
            let kept = sampler.kept(&logits);
            // The draws that land past the top token's share land in the tail, and before it
            // on the top token, whichever end the top token is at.
            let at = |u: f64| draw(&kept, u).unwrap() as usize;
            let (in_top, in_tail) = if top == 0 {
                (1.0 - share * 1.1, 1.0 - share * 0.9)
            } else {
                (share * 1.1, share * 0.9)
            };
            assert_eq!(at(in_top), top, "{share}");
            assert_ne!(at(in_tail), top, "{share}");
        }
        // NaN never wins greedy.
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn picks_follow_the_kept_weights() {
        // 20,000 draws over 4 kept tokens of known probability (top-k drops the fifth).
        let logits = [2.0f32, 1.0, 0.0, 1.5, -3.0];
        let params = SamplingParams {
            top_k: 4,
            seed: Some(9),
            ..Default::default()
        };
        let weights: Vec<f64> = [2.0f64, 1.0, 0.0, 1.5].iter().map(|l| l.exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut s = Sampler::new(params);
        let mut counts = [0usize; 5];
        let draws = 20_000;
        for _ in 0..draws {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        assert_eq!(counts[4], 0);
        for (token, w) in weights.iter().enumerate() {
            let p = w / total;
            let sigma = (p * (1.0 - p) / draws as f64).sqrt();
            let seen = counts[token] as f64 / draws as f64;
            assert!(
                (seen - p).abs() < 5.0 * sigma,
                "token {token}: {seen} vs {p}"
            );
        }
    }

    /// Greedy picks from the same logits, step after step, under a sampler's penalties.
    fn greedy_run(
        params: SamplingParams,
        prompt: &[u32],
        logits: &[f32],
        steps: usize,
    ) -> Vec<u32> {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params
        })
        .with_prompt(prompt);
        (0..steps).map(|_| s.sample(logits, &[])).collect()
    }

    #[test]
    fn frequency_and_presence_penalties_count_the_output() {
        let logits = [1.0, 0.9, 0.8];
        // Frequency: each pick of a token lowers it again (0: 1.0 → 0.85 → 0.7).
        let frequency = SamplingParams {
            frequency_penalty: 0.15,
            ..Default::default()
        };
        assert_eq!(greedy_run(frequency, &[], &logits, 4), [0, 1, 0, 2]);
        // Presence: once per token, however often it was picked.
        let presence = SamplingParams {
            presence_penalty: 0.15,
            ..Default::default()
        };
        assert_eq!(greedy_run(presence, &[], &logits, 4), [0, 1, 0, 0]);
        // Negative values reward repeats.
        let sticky = SamplingParams {
            presence_penalty: -0.5,
            ..Default::default()
        };
        assert_eq!(greedy_run(sticky, &[], &[0.9, 1.0], 3), [1, 1, 1]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let repeat = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 0 is in the prompt: 2.0 / 2 = 1.0 falls below token 1's 1.5.
        assert_eq!(greedy_run(repeat.clone(), &[0], &[2.0, 1.5], 1), [1]);
        // Negative: -1.0 · 2 = -2.0 falls below -1.5.
        assert_eq!(greedy_run(repeat.clone(), &[0], &[-1.0, -1.5], 1), [1]);
        // The output counts too: token 1 (not in the prompt) once picked, drops to 0.75.
        assert_eq!(greedy_run(repeat, &[], &[1.2, 1.5], 2), [1, 0]);
    }

    #[test]
    fn logit_bias_and_suppressed_tokens_move_the_choice() {
        let bias = SamplingParams {
            logit_bias: vec![(2, 5.0), (0, -100.0), (99, 1.0)], // 99: beyond the vocabulary
            ..Default::default()
        };
        assert_eq!(greedy_run(bias, &[], &[3.0, 0.0, 0.0], 1), [2]);
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[3.0, 2.0, 1.0], &[0]), 1);
        assert_eq!(s.sample(&[3.0, 2.0, 1.0], &[]), 0);
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_top_one() {
        let logits = [5.0, 4.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        let picks: Vec<u32> = (0..300).map(|_| s.sample(&logits, &[])).collect();
        assert!(!picks.contains(&2), "p(2)/p(0) = e^-5 is below 0.5");
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn logprobs_of_infinite_and_nan_logits_are_numbers() {
        // Two +inf logits share all the probability; the rest (a NaN among them) have none.
        let lp = logprobs(&[1.0, f32::INFINITY, f32::NAN, f32::INFINITY, 5.0], 1, 4);
        assert!((lp.logprob + 2f32.ln()).abs() < 1e-6, "{lp:?}");
        let ranked: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ranked, [1, 3, 4, 0], "{lp:?}");
        assert!(
            lp.top[2..].iter().all(|&(_, l)| l == LOGPROB_FLOOR),
            "{lp:?}"
        );
        // A NaN logit is impossible, ranks after every number, and does not spoil the rest.
        let lp = logprobs(&[f32::NAN, 0.0, f32::NEG_INFINITY, 0.0], 0, 4);
        assert_eq!(lp.logprob, LOGPROB_FLOOR);
        assert_eq!(lp.top[0].1, -(2f32.ln()));
        assert_eq!(lp.top[1].1, -(2f32.ln()));
        assert_eq!(lp.top[2..], [(2, LOGPROB_FLOOR), (0, LOGPROB_FLOOR)]);
        // A single +inf logit takes it all: 0, not -0.
        let lp = logprobs(&[f32::INFINITY, 1.0], 0, 0);
        assert!(lp.logprob == 0.0 && lp.logprob.is_sign_positive());
        // Nothing possible at all: every entry at the floor, never NaN.
        let lp = logprobs(&[f32::NEG_INFINITY, f32::NAN], 1, 2);
        assert!(lp.top.iter().all(|&(_, l)| l == LOGPROB_FLOOR));
        assert_eq!(lp.logprob, LOGPROB_FLOOR);
        // A finite logit far below the rest is floored too.
        assert_eq!(logprobs(&[0.0, 20_000.0], 0, 0).logprob, LOGPROB_FLOOR);
    }

    #[test]
    fn logprobs_are_normalised() {
        let lp = logprobs(&[1.0, 2.0, 3.0], 0, 2);
        let total: f32 = [1.0f32, 2.0, 3.0].iter().map(|l| (l - 3.0f32).exp()).sum();
        assert!((lp.logprob - (1.0 - 3.0 - total.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    /// A long tail of tiny probabilities counts wherever it lies in the row: summed in float32,
    /// each of these terms is lost once the total reaches the top token's 1.
    #[test]
    fn logprobs_count_a_long_tail_wherever_it_lies() {
        let tail = 129_279;
        let want = -(1.0 + tail as f64 * (-17.0f64).exp()).ln();
        let mut top_first = vec![-17.0f32; tail + 1];
        top_first[0] = 0.0;
        let mut top_last = top_first.clone();
        top_last.rotate_left(1);
        for (row, top) in [(&top_first, 0), (&top_last, tail as u32)] {
            let got = f64::from(logprobs(row, top, 0).logprob);
            assert!((got - want).abs() < 1e-5, "top at {top}: {got} vs {want}");
        }
    }

    #[test]
    fn invalid_parameters_are_named() {
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        for (bad, name) in [
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(7, 101.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
        ] {
            assert!(
                bad.validate().unwrap_err().to_string().contains(name),
                "{name}"
            );
        }
    }
}
