/* Pure helpers of the BPF programs: no maps, no BPF helpers, so tests/unit compile them for the host with gcc
 * and check them against their Python models. Needs __u8/__u32/__u64 (linux/types.h) and event.h. */
#ifndef OTEL_EBPF_BITS_H
#define OTEL_EBPF_BITS_H

/* Index of the latency histogram bucket for a duration: 2^(i-1) < ns <= 2^i, the last one open-ended. */
static __always_inline __u32 latency_bucket(__u64 ns)
{
	if (ns <= 1)
		return 0;
	__u64 v = ns - 1;
	__u32 log2 = 0, shift;
	shift = (v > 0xFFFFFFFF) << 5; v >>= shift; log2 |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; log2 |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; log2 |= shift;
	shift = (v > 0xF) << 2; v >>= shift; log2 |= shift;
	shift = (v > 0x3) << 1; v >>= shift; log2 |= shift;
	log2 |= (v >> 1);
	return log2 + 1 < LATENCY_BUCKETS ? log2 + 1 : LATENCY_BUCKETS - 1;
}

/* SplitMix64's output function: a bijection of 64-bit values that looks random. Ids are made from a random
 * seed per call stack and a counter, so each call costs no random-number helper and two ids of one stack
 * never collide. */
static __always_inline __u64 mix64(__u64 z)
{
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* Value of one lower-case hex digit, or 16 for anything else (W3C trace context allows only these). */
static __always_inline __u32 hex_digit(__u8 c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return 16;
}

/* `bytes` bytes from twice as many hex digits: 1 when they are not all zero, 0 when they are, -1 when a digit
 * is not lower-case hex. */
static __always_inline int decode_hex(const __u8 *text, __u8 *out, int bytes)
{
	__u8 any = 0;
	for (int i = 0; i < bytes; i++) {
		__u32 hi = hex_digit(text[2 * i]), lo = hex_digit(text[2 * i + 1]);
		if (hi > 15 || lo > 15)
			return -1;
		out[i] = hi << 4 | lo;
		any |= out[i];
	}
	return any != 0;
}

/* A W3C traceparent value ("00-<32 hex>-<16 hex>-<2 hex>"), read from `text` (at least 55 bytes, the length of
 * version 00; `length` says how many are valid), into trace_id (16 bytes), span_id (8) and the sampled flag.
 * Returns 0 unless it is valid as W3C section 3.2 says: version 00 exactly 55 bytes, a higher version at
 * least 55 and then '-', never version ff, upper-case hex or all-zero ids. */
static __always_inline int parse_traceparent(const __u8 *text, __u32 length, __u8 *trace_id, __u8 *span_id,
					     __u32 *sampled)
{
	if (length < 55 || text[2] != '-' || text[35] != '-' || text[52] != '-')
		return 0;
	__u32 version = hex_digit(text[0]) << 4 | hex_digit(text[1]);
	if (hex_digit(text[0]) > 15 || hex_digit(text[1]) > 15 || version == 0xff)
		return 0;
	if (version == 0 ? length != 55 : (length > 55 && text[55] != '-'))
		return 0;
	if (decode_hex(&text[3], trace_id, 16) <= 0 || decode_hex(&text[36], span_id, 8) <= 0)
		return 0;
	__u32 hi = hex_digit(text[53]), lo = hex_digit(text[54]);
	if (hi > 15 || lo > 15)
		return 0;
	*sampled = lo & 1;
	return 1;
}

#endif
