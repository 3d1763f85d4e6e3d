-- POST the submit body in the file BENCH_BODY with the key BENCH_KEY (the URL names the
-- submit route). X-DashScope-Async is what DashScope itself requires; the gateway adds it.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local file = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-DashScope-Async"] = "enable"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
