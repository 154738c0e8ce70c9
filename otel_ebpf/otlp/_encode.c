/* The inner loop of the span encoder (encode.py), compiled: per span, its template copied and its variable
 * fields written, with no Python object per span. encode.py has the same algorithm in numpy for when this
 * extension was not built; tests/unit/test_encode.py checks that both give the same bytes.
 *
 * fill(records, stride, key, row_of_kind, table, blob, fields, offset_ns) -> bytes, or the int kind of the
 * first span whose template does not exist yet (the caller makes it and calls again)
 *   records      the span records (stride bytes each), as the ring buffer holds them
 *   key          only records of this process (their pid and process_seq as one little-endian u64)
 *   row_of_kind  int32 per kind (probe_id << 3 | variant bits): the span's row in `table`, -1 if none
 *   table        int32 rows of TABLE_COLUMNS: where the template starts in `blob`, its length, then the offset of
 *                each variable field in the template (-1: the template has no such field)
 *   fields       the offsets of the FIELDS below in a record
 *   offset_ns    added to both times (kernel monotonic clock -> Unix time) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { T_START, T_LENGTH, T_TRACE, T_SPAN, T_PARENT, T_BEGIN, T_END, T_THREAD, T_GOROUTINE, TABLE_COLUMNS };
enum { F_TRACE, F_SPAN, F_PARENT, F_BEGIN, F_END, F_TID, F_GOROUTINE, F_KEY, F_PROBE, F_FLAGS, FIELDS };
enum { PARENT = 1, GOROUTINE = 2, REMOTE = 4, VARIANT_BITS = 3 }; /* encode.py _PARENT, _GOROUTINE, _REMOTE */
#define SPAN_REMOTE_PARENT 1 /* bpf/event.h */
static const Py_ssize_t field_size[FIELDS] = {16, 8, 8, 8, 8, 4, 8, 8, 4, 4};
#define THREAD_WIDTH 4
#define GOROUTINE_WIDTH 9

/* value as a varint of exactly `width` bytes: continuation bits on all but the last. */
static void put_varint(uint8_t *out, uint64_t value, int width)
{
	for (int i = 0; i < width - 1; i++) {
		out[i] = (uint8_t)(value & 0x7F) | 0x80;
		value >>= 7;
	}
	out[width - 1] = (uint8_t)(value & 0x7F);
}

static uint64_t u64_at(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static uint32_t u32_at(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

static PyObject *fill(PyObject *self, PyObject *args)
{
	Py_buffer records, kinds, table, blob;
	Py_ssize_t stride;
	PyObject *fields_tuple;
	unsigned long long key, offset;
	(void)self;
	if (!PyArg_ParseTuple(args, "y*nKy*y*y*O!K", &records, &stride, &key, &kinds, &table, &blob, &PyTuple_Type,
			      &fields_tuple, &offset))
		return NULL;
	PyObject *result = NULL;
	Py_ssize_t fields[FIELDS];
	Py_ssize_t n = stride > 0 ? records.len / stride : 0;
	const int32_t *row_of_kind = kinds.buf;
	Py_ssize_t known_kinds = kinds.len / (Py_ssize_t)sizeof(int32_t);
	const int32_t *rows = table.buf;
	Py_ssize_t table_rows = table.len / (Py_ssize_t)(sizeof(int32_t) * TABLE_COLUMNS);
	if (PyTuple_GET_SIZE(fields_tuple) != FIELDS) {
		PyErr_SetString(PyExc_ValueError, "fill: wrong number of fields");
		goto done;
	}
	for (int f = 0; f < FIELDS; f++) {
		fields[f] = PyLong_AsSsize_t(PyTuple_GET_ITEM(fields_tuple, f));
		if (fields[f] < 0 || fields[f] + field_size[f] > stride) {
			if (!PyErr_Occurred())
				PyErr_SetString(PyExc_ValueError, "fill: a field lies outside the record");
			goto done;
		}
	}
	/* First pass: every span's row, and the size of the result. */
	Py_ssize_t total = 0;
	const uint8_t *record = records.buf;
	for (Py_ssize_t i = 0; i < n; i++, record += stride) {
		if (u64_at(record + fields[F_KEY]) != key)
			continue;
		uint64_t kind = (uint64_t)u32_at(record + fields[F_PROBE]) << VARIANT_BITS
				| (u64_at(record + fields[F_PARENT]) ? PARENT : 0)
				| (u64_at(record + fields[F_GOROUTINE]) ? GOROUTINE : 0)
				| (u32_at(record + fields[F_FLAGS]) & SPAN_REMOTE_PARENT ? REMOTE : 0);
		int32_t row = kind < (uint64_t)known_kinds ? row_of_kind[kind] : -1;
		if (row < 0 || row >= table_rows) {
			result = PyLong_FromUnsignedLongLong(kind);
			goto done;
		}
		const int32_t *entry = rows + (Py_ssize_t)row * TABLE_COLUMNS;
		if (entry[T_START] < 0 || entry[T_START] + entry[T_LENGTH] > blob.len) {
			PyErr_SetString(PyExc_ValueError, "fill: a template lies outside the blob");
			goto done;
		}
		total += entry[T_LENGTH];
	}
	result = PyBytes_FromStringAndSize(NULL, total);
	if (!result)
		goto done;
	uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
	record = records.buf;
	for (Py_ssize_t i = 0; i < n; i++, record += stride) {
		if (u64_at(record + fields[F_KEY]) != key)
			continue;
		uint64_t parent = u64_at(record + fields[F_PARENT]), goroutine = u64_at(record + fields[F_GOROUTINE]);
		uint64_t kind = (uint64_t)u32_at(record + fields[F_PROBE]) << VARIANT_BITS | (parent ? PARENT : 0)
				| (goroutine ? GOROUTINE : 0)
				| (u32_at(record + fields[F_FLAGS]) & SPAN_REMOTE_PARENT ? REMOTE : 0);
		const int32_t *entry = rows + (Py_ssize_t)row_of_kind[kind] * TABLE_COLUMNS;
		memcpy(out, (const uint8_t *)blob.buf + entry[T_START], entry[T_LENGTH]);
		memcpy(out + entry[T_TRACE], record + fields[F_TRACE], 16);
		memcpy(out + entry[T_SPAN], record + fields[F_SPAN], 8);
		if (entry[T_PARENT] >= 0)
			memcpy(out + entry[T_PARENT], &parent, 8);
		uint64_t begin = u64_at(record + fields[F_BEGIN]) + offset, end = u64_at(record + fields[F_END]) + offset;
		memcpy(out + entry[T_BEGIN], &begin, 8); /* fixed64 is little-endian, as x86-64 is */
		memcpy(out + entry[T_END], &end, 8);
		put_varint(out + entry[T_THREAD], u32_at(record + fields[F_TID]), THREAD_WIDTH);
		if (entry[T_GOROUTINE] >= 0)
			put_varint(out + entry[T_GOROUTINE], goroutine, GOROUTINE_WIDTH);
		out += entry[T_LENGTH];
	}
done:
	PyBuffer_Release(&records);
	PyBuffer_Release(&kinds);
	PyBuffer_Release(&table);
	PyBuffer_Release(&blob);
	return result;
}

static PyMethodDef methods[] = {
	{"fill", fill, METH_VARARGS, "Encode span records with their templates (see the file's comment)."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_encode", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__encode(void)
{
	return PyModule_Create(&module);
}
