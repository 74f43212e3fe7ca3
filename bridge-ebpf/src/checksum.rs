//! Ones'-complement checksum arithmetic (RFC 1624), for checksums the programs update
//! themselves: XDP frames, and the headers an ICMP error quotes.

/// Adds `new - old` (16-bit big-endian words) to a ones'-complement sum.
#[inline(always)]
fn replace(sum: u32, old: u16, new: u16) -> u32 {
    sum + u32::from(!old) + u32::from(new)
}

#[inline(always)]
pub fn word(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for the words of `old` -> `new`.
#[inline(always)]
pub fn update(check: u16, old: &[u8; 4], new: &[u8; 4], old_word: u16, new_word: u16) -> u16 {
    let mut sum = u32::from(!check);
    sum = replace(sum, word(old, 0), word(new, 0));
    sum = replace(sum, word(old, 2), word(new, 2));
    sum = replace(sum, old_word, new_word);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
