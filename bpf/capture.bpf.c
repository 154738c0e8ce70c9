/* Arguments and results as span data: read only by probes whose cookie has COOKIE_CAPTURE, and only what
 * their capture_plan names (a probe spec's captures). Part of otel_ebpf.bpf.c. */

/* The registers a slot can name, by REG_* number: loaded once per capture, and indexed rather than switched on
 * (the compiler would merge a switch's loads into one from a computed context offset, which the verifier
 * refuses). */
static __always_inline void load_registers(struct pt_regs *ctx, __u64 *regs)
{
	regs[REG_RDI] = ctx->di;
	regs[REG_RSI] = ctx->si;
	regs[REG_RDX] = ctx->dx;
	regs[REG_RCX] = ctx->cx;
	regs[REG_R8] = ctx->r8;
	regs[REG_R9] = ctx->r9;
	regs[REG_RAX] = ctx->ax;
	regs[REG_RBX] = ctx->bx;
	regs[REG_R10] = ctx->r10;
	regs[REG_R11] = ctx->r11;
	regs[REG_RBP] = ctx->bp;
	regs[REG_RSP] = ctx->sp;
	regs[REG_R12] = ctx->r12;
	regs[REG_R13] = ctx->r13;
	regs[REG_R14] = ctx->r14;
	regs[REG_R15] = ctx->r15;
}

/* One slot read into `out`; strings and bytes are copied to notice->data at *used, which moves past them.
 * `at` and the sizes are masked for the verifier (at < CAPTURE_DATA, size < 2 * CAPTURE_STRING_MAX, within
 * data); they are already smaller. */
static __always_inline void capture_one(__u64 *regs, struct capture_slot *slot, struct captured_value *out,
					struct capture_notice *notice, __u32 *used)
{
	__u64 reg = regs[slot->reg & (CAPTURE_REGISTERS - 1)];
	if (slot->flags & SLOT_MEMORY) {
		__u64 address = reg + (__s64)slot->offset;
		reg = 0;
		if (bpf_probe_read_user(&reg, sizeof(reg), (void *)address)) {
			out->value = 0;
			out->length = 0;
			out->flags = CAPTURED_FAULT;
			out->pad = 0;
			return;
		}
	}
	out->value = reg;
	out->length = 0;
	out->flags = 0;
	out->pad = 0;
	if (slot->kind == CAPTURE_VALUE)
		return;
	__u32 at = *used;
	out->value = at;
	if (at >= CAPTURE_DATA) {
		out->flags = CAPTURED_CUT; /* the strings before it took all the room */
		return;
	}
	asm volatile("" : "+r"(at));
	at &= CAPTURE_DATA - 1;
	__u32 bound = slot->length;
	if (bound > CAPTURE_STRING_MAX)
		bound = CAPTURE_STRING_MAX;
	if (slot->kind == CAPTURE_STRING) {
		/* Two bytes past the bound: a string of exactly `bound` bytes is then told from a longer one. */
		__u32 size = bound + 2;
		asm volatile("" : "+r"(size));
		size &= 2 * CAPTURE_STRING_MAX - 1;
		long copied = bpf_probe_read_user_str(notice->data + at, size, (void *)reg);
		if (copied <= 0) {
			out->flags = CAPTURED_FAULT;
			return;
		}
		__u32 length = copied - 1; /* without its NUL */
		if (length > bound) {
			length = bound;
			out->flags = CAPTURED_CUT;
		}
		out->length = length;
		*used = at + length;
		return;
	}
	__u64 want = bound;
	if (slot->kind == CAPTURE_GO_STRING) {
		__u64 length = regs[slot->length_reg & (CAPTURE_REGISTERS - 1)];
		if (length > bound)
			out->flags = CAPTURED_CUT;
		else
			want = length;
	}
	asm volatile("" : "+r"(want));
	want &= 2 * CAPTURE_STRING_MAX - 1;
	if (want && bpf_probe_read_user(notice->data + at, want, (void *)reg)) {
		out->flags = CAPTURED_FAULT;
		return;
	}
	out->length = want;
	*used = at + want;
}

static __always_inline void send_capture(struct capture_notice *notice, __u32 pid, __u32 probe_id, __u64 span_id,
					 __u16 at, __u16 values, __u32 used)
{
	notice->header.kind = NOTICE_CAPTURE;
	notice->pid = pid;
	notice->probe_id = probe_id;
	notice->span_id = span_id;
	notice->at = at;
	notice->count = values;
	__u32 size = offsetof(struct capture_notice, data) + used;
	asm volatile("" : "+r"(size));
	if (size > sizeof(*notice))
		size = sizeof(*notice);
	notice->data_length = size - offsetof(struct capture_notice, data);
	notice->header.length = size;
	if (notices.ringbuf_output(notice, size, 0))
		count(COUNTER_NOTICES_LOST);
}

/* Reads slots up to the first CAPTURE_NONE (at most `count`) into a capture notice of the call and sends it. */
static __always_inline void capture_slots(struct pt_regs *ctx, struct capture_slot *slots, int count, __u32 pid,
					  __u32 probe_id, __u64 span_id, __u16 at)
{
	__u32 zero = 0;
	struct capture_notice *notice = capture_scratch.lookup(&zero);
	if (!notice)
		return;
	__u64 regs[CAPTURE_REGISTERS] = {};
	load_registers(ctx, regs);
	__u32 used = 0;
	__u16 values = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < MAX_CAPTURES; i++) {
		if (i >= count || slots[i].kind == CAPTURE_NONE)
			break;
		capture_one(regs, &slots[i], &notice->values[i], notice, &used);
		values = i + 1;
	}
	send_capture(notice, pid, probe_id, span_id, at, values, used);
}

/* At a sampled call's entry: the arguments its plan names. */
static __always_inline void capture_entry(struct pt_regs *ctx, __u32 probe_id, __u64 span_id)
{
	struct capture_plan *plan = capture_plans.lookup(&probe_id);
	struct bpf_pidns_info ns = {};
	if (plan && !visible_ids(&ns))
		capture_slots(ctx, plan->entry, MAX_CAPTURES, ns.tgid, probe_id, span_id, CAPTURE_AT_ENTRY);
}

/* At the return of a call whose span is about to be sent: its result and error word, if the plan names them. */
static __always_inline void capture_result(struct pt_regs *ctx, __u32 probe_id, __u64 span_id, __u32 pid)
{
	struct capture_plan *plan = capture_plans.lookup(&probe_id);
	if (plan && plan->result[0].kind != CAPTURE_NONE)
		capture_slots(ctx, plan->result, CAPTURE_RESULTS, pid, probe_id, span_id, CAPTURE_AT_RETURN);
}
