/* Probes that fire for more calls than are wanted (COOKIE_FILTER: Python's function__entry and function__return
 * fire for every Python call): a call is traced only when its name strings match a rule of the probe's
 * name_filter, checked at both sites so that entries and returns stay paired. Part of otel_ebpf.bpf.c. */

/* Whether `string` (`length` bytes, NUL excluded; at most `size`) matches the pattern. `size` is a power of two:
 * indexes are masked with it for the verifier. */
static __always_inline int pattern_matches(struct name_pattern *pattern, const char *string, __u32 length, __u32 size)
{
	__u32 want = pattern->length;
	if (pattern->kind == PATTERN_ANY)
		return 1;
	if (want > NAME_PATTERN_MAX || want > length || (pattern->kind == PATTERN_EXACT && want != length))
		return 0;
	__u32 from = pattern->kind == PATTERN_SUFFIX ? length - want : 0;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < NAME_PATTERN_MAX; i++) {
		if (i >= want)
			break;
		if (string[(from + i) & (size - 1)] != pattern->text[i & (NAME_PATTERN_MAX - 1)])
			return 0;
	}
	return 1;
}

/* Copies a NUL-terminated string of the traced process; returns its length without the NUL, or -1. */
static __always_inline long read_name(char *into, __u32 size, __u64 address)
{
	long copied = bpf_probe_read_user_str(into, size, (void *)address);
	return copied > 0 ? copied - 1 : -1;
}

/* The address of the call's name string when a rule matches it (what pairs its entry with its return), else 0. */
static __always_inline __u64 passes_filter(struct pt_regs *ctx, __u32 probe_id, int at_entry)
{
	struct name_filter *filter = name_filters.lookup(&probe_id);
	__u32 zero = 0;
	struct filter_strings *strings = filter_scratch.lookup(&zero);
	if (!filter || !strings)
		return 0;
	__u64 regs[CAPTURE_REGISTERS] = {};
	load_registers(ctx, regs);
	__u8 name_reg = at_entry ? filter->entry_name_reg : filter->return_name_reg;
	__u8 file_reg = at_entry ? filter->entry_file_reg : filter->return_file_reg;
	__u64 name = regs[name_reg & (CAPTURE_REGISTERS - 1)];
	long name_length = read_name(strings->name, FILTER_NAME_MAX, name);
	if (name_length < 0)
		return 0;
	long file_length = -2; /* read once a rule's name matches */
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < NAME_RULES; i++) {
		if (i >= filter->rules)
			break;
		struct name_rule *rule = &filter->rule[i];
		if (!pattern_matches(&rule->name, strings->name, name_length, FILTER_NAME_MAX))
			continue;
		if (rule->file.kind == PATTERN_ANY)
			return name;
		if (file_length == -2)
			file_length = read_name(strings->file, FILTER_FILE_MAX, regs[file_reg & (CAPTURE_REGISTERS - 1)]);
		if (file_length >= 0 && pattern_matches(&rule->file, strings->file, file_length, FILTER_FILE_MAX))
			return name;
	}
	return 0;
}
