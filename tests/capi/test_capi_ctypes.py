"""The C interface from Python through ctypes: the library loads, an engine trains a small model
at stages 0-3 with one rank (in engine memory, and in the script's own borrowed arrays), and the
master weights equal a float64 AdamW written here, element for element within float32 noise;
errors come back as status codes with a message.

Usage: test_capi_ctypes.py /path/to/libshardopt_c.so    (standard library only)"""
import ctypes as C
import math
import sys

lib = C.CDLL(sys.argv[1])
failures = []
passed = 0


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(what)
        print("FAILED:", what, file=sys.stderr)


class TensorDesc(C.Structure):
    _fields_ = [("name", C.c_char_p), ("ndim", C.c_int), ("shape", C.POINTER(C.c_int64)), ("group", C.c_int)]


class View(C.Structure):
    _fields_ = [("data", C.c_void_p), ("dtype", C.c_int), ("numel", C.c_size_t)]


class StepResult(C.Structure):
    _fields_ = [("applied", C.c_int), ("step", C.c_int64), ("loss_scale", C.c_float), ("grad_norm", C.c_double),
                ("clip_coefficient", C.c_float)]


P = C.c_void_p
lib.shardopt_last_error.restype = C.c_char_p
lib.shardopt_version.restype = C.c_char_p
for name, args in {
    "shardopt_config_create": [C.POINTER(P)], "shardopt_config_set": [P, C.c_char_p, C.c_char_p],
    "shardopt_backend_create_cpu": [C.POINTER(P)], "shardopt_group_create": [C.c_int, C.c_int64, C.POINTER(P)],
    "shardopt_comm_create_in_process": [P, C.c_int, P, C.POINTER(P)],
    "shardopt_engine_create": [P, P, P, C.POINTER(P)],
    "shardopt_engine_add_block": [P, C.c_char_p, C.c_int, C.POINTER(TensorDesc), C.POINTER(C.c_int)],
    "shardopt_engine_initialize": [P, P, P, C.c_uint64],
    "shardopt_engine_acquire": [P, C.c_int, C.POINTER(View), C.c_int],
    "shardopt_engine_gradients": [P, C.c_int, C.POINTER(View), C.c_int],
    "shardopt_engine_grads_ready": [P, C.c_int], "shardopt_engine_release": [P, C.c_int],
    "shardopt_engine_step": [P, C.POINTER(StepResult)], "shardopt_engine_read_master": [P, P, P],
    "shardopt_engine_borrow_gradients": [P, C.c_int, P], "shardopt_engine_borrow_parameters": [P, C.c_int, P],
    "shardopt_engine_memory_borrowed": [P, C.c_int, C.POINTER(C.c_size_t)],
}.items():
    getattr(lib, name).argtypes = args
    getattr(lib, name).restype = C.c_int
for name in ["shardopt_config_destroy", "shardopt_backend_destroy", "shardopt_group_destroy",
             "shardopt_comm_destroy", "shardopt_engine_destroy"]:
    getattr(lib, name).argtypes = [P]
    getattr(lib, name).restype = None

INIT = C.CFUNCTYPE(None, C.c_void_p, C.c_int, C.c_char_p, C.c_size_t, C.c_size_t, C.POINTER(C.c_float))
VALUES = C.CFUNCTYPE(None, C.c_void_p, C.c_int, C.c_size_t, C.c_size_t, C.POINTER(C.c_float))


def ok(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: status {status}: {lib.shardopt_last_error().decode()}")


def f32(x):
    return C.c_float(x).value


SHAPES = {"w": [6, 5], "b": [5]}
NUMEL = {"w": 30, "b": 5}
NAMES = ["w", "b"]
LR, B1, B2, EPS, WD, STEPS = 0.02, 0.9, 0.999, 1e-8, 0.05, 3


def initial(t, i):
    return f32(0.3 * math.cos(0.5 + 0.71 * i + 2.3 * t))


def grad(t, i, s):
    return ((i * 5 + t * 3 + s * 7) % 17 - 8) / 32.0


def reference():
    out = {}
    for t, name in enumerate(NAMES):
        p = [initial(t, i) for i in range(NUMEL[name])]
        m = [0.0] * len(p)
        v = [0.0] * len(p)
        for s in range(1, STEPS + 1):
            bc1, bc2 = 1 - B1 ** s, 1 - B2 ** s
            for i in range(len(p)):
                g = grad(t, i, s)
                m[i] = B1 * m[i] + (1 - B1) * g
                v[i] = B2 * v[i] + (1 - B2) * g * g
                p[i] -= LR * WD * p[i]
                p[i] -= LR * (m[i] / bc1) / (math.sqrt(v[i] / bc2) + EPS)
        out[name] = p
    return out


def train(stage, borrowed=False):
    """borrowed: the gradients and parameters live in this script's own arrays (one array each,
    w then b), borrowed by the engine: the script writes gradients there and reads the updated
    parameters there, without gradients() or acquire()."""
    cfg, be, group, comm, eng = P(), P(), P(), P(), P()
    ok(lib.shardopt_config_create(C.byref(cfg)), "config")
    for k, v in {"stage": str(stage), "lr": str(LR), "weight_decay": str(WD), "alignment": "4"}.items():
        ok(lib.shardopt_config_set(cfg, k.encode(), v.encode()), k)
    ok(lib.shardopt_backend_create_cpu(C.byref(be)), "backend")
    ok(lib.shardopt_group_create(1, 0, C.byref(group)), "group")
    ok(lib.shardopt_comm_create_in_process(group, 0, be, C.byref(comm)), "comm")
    ok(lib.shardopt_engine_create(cfg, be, comm, C.byref(eng)), "engine")
    shapes = [(C.c_int64 * len(SHAPES[n]))(*SHAPES[n]) for n in NAMES]
    descs = (TensorDesc * 2)(*[TensorDesc(n.encode(), len(SHAPES[n]), shapes[k], 0) for k, n in enumerate(NAMES)])
    ok(lib.shardopt_engine_add_block(eng, b"block", 2, descs, None), "add_block")
    own_grads = (C.c_float * 35)(*([99.0] * 35))  # garbage: the engine zeroes it at initialize
    own_params = (C.c_float * 35)()
    offset = {"w": 0, "b": 30}
    if borrowed:
        for t, n in enumerate(NAMES):
            at = offset[n] * C.sizeof(C.c_float)
            ok(lib.shardopt_engine_borrow_gradients(eng, t, C.addressof(own_grads) + at), "borrow_gradients")
            ok(lib.shardopt_engine_borrow_parameters(eng, t, C.addressof(own_params) + at), "borrow_parameters")

    seen = []

    @INIT
    def init(user, tensor, name, begin, count, out):
        seen.append((tensor, name.decode()))
        for i in range(count):
            out[i] = initial(tensor, begin + i)

    ok(lib.shardopt_engine_initialize(eng, C.cast(init, P), None, 0), "initialize")
    check(all(NAMES[t] == n for t, n in seen) and seen, f"stage {stage}: init callback tensor indices {seen}")
    views = (View * 2)()
    result = StepResult()
    for s in range(1, STEPS + 1):
        if borrowed:
            for t, n in enumerate(NAMES):
                for i in range(NUMEL[n]):
                    own_grads[offset[n] + i] += grad(t, i, s)
            ok(lib.shardopt_engine_grads_ready(eng, 0), "grads_ready")
            ok(lib.shardopt_engine_step(eng, C.byref(result)), "step")
            check(result.applied == 1 and result.step == s, f"stage {stage}: borrowed step result {result.step}")
            continue
        ok(lib.shardopt_engine_acquire(eng, 0, views, 2), "acquire")
        ok(lib.shardopt_engine_gradients(eng, 0, views, 2), "gradients")
        for t, name in enumerate(NAMES):
            g = C.cast(views[t].data, C.POINTER(C.c_float))
            for i in range(views[t].numel):
                g[i] += grad(t, i, s)
        ok(lib.shardopt_engine_grads_ready(eng, 0), "grads_ready")
        ok(lib.shardopt_engine_release(eng, 0), "release")
        ok(lib.shardopt_engine_step(eng, C.byref(result)), "step")
        check(result.applied == 1 and result.step == s, f"stage {stage}: step result {result.applied} {result.step}")
    master = {n: [math.nan] * NUMEL[n] for n in NAMES}

    @VALUES
    def collect(user, tensor, begin, count, values):
        for i in range(count):
            master[NAMES[tensor]][begin + i] = values[i]

    ok(lib.shardopt_engine_read_master(eng, C.cast(collect, P), None), "read_master")
    if borrowed:
        nbytes = C.c_size_t()
        ok(lib.shardopt_engine_memory_borrowed(eng, 0, C.byref(nbytes)), "memory_borrowed")
        check(nbytes.value == 2 * 35 * 4, f"stage {stage}: borrowed bytes {nbytes.value}")
        check(all(own_params[offset[n] + i] == master[n][i] for n in NAMES for i in range(NUMEL[n])),
              f"stage {stage}: the borrowed parameters are the master weights")
    lib.shardopt_engine_destroy(eng)
    lib.shardopt_comm_destroy(comm)
    lib.shardopt_group_destroy(group)
    lib.shardopt_backend_destroy(be)
    lib.shardopt_config_destroy(cfg)
    return master


check(lib.shardopt_abi_version() == 1, "ABI version")
ref = reference()
for stage, borrowed in [(k, b) for k in range(4) for b in (False, True)]:
    got = train(stage, borrowed)
    worst = 0.0
    for n in NAMES:
        for a, b in zip(got[n], ref[n]):
            err = abs(a - b)
            worst = max(worst, err) if not math.isnan(err) else math.inf
            check(err <= 1e-6 + 1e-6 * abs(b), f"stage {stage} tensor {n}: {a} vs float64 {b}")
    print(f"stage {stage}{' (borrowed memory)' if borrowed else ''}: largest difference from the float64 reference "
          f"{worst:.3g}")

cfg = P()
ok(lib.shardopt_config_create(C.byref(cfg)), "config")
status = lib.shardopt_config_set(cfg, b"learning_rate", b"0.1")
check(status == 1 and b"learning_rate" in lib.shardopt_last_error(), "unknown key is INVALID_ARGUMENT naming it")
lib.shardopt_config_destroy(cfg)

print(f"{passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
