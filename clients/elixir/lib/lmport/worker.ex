defmodule LMPort.Worker do
  @moduledoc """
  One lmport worker process (`python -m lmport.bridge.worker`) behind an Erlang Port, as a GenServer.

  Frames are `{:packet, 4}` msgpack maps (protocol v1). Any number of requests are in flight at once, each
  with its own integer id; the worker batches them in one engine. The GenServer:

    * waits for `hello` in `init/1` and refuses a worker that speaks another protocol major version
      (`"protocol_mismatch"`);
    * monitors every caller and sends `cancel` for its requests when the caller dies;
    * holds a client-side deadline per request (its timeout plus `:grace_ms`, at most 2^32 - 1 ms, the longest
      Erlang timer): on expiry it sends `cancel`, answers the caller with
      `%LMPort.Error{code: "deadline_exceeded", details: %{"client_side" => true}}` and pings the worker; a worker
      that does not answer the ping in time has its process group killed and the GenServer stops (its supervisor
      restarts it);
    * answers every pending caller with `%LMPort.Error{code: "worker_exited"}` when the worker exits, then stops;
    * on a frame it cannot decode, answers every pending caller with `"protocol_error"`, kills the worker's
      process group and stops; a stream whose chunk `seq` skips raises `"protocol_error"` in its consumer and is
      cancelled;
    * on shutdown sends `shutdown`, waits `:grace_ms`, then `kill -TERM` and `kill -KILL` the worker's
      process group (the `pgid` from `hello`).

  ## Options (`start_link/1`)

    * `:name` — register the GenServer (several named workers may run side by side)
    * `:python` — interpreter path (see `LMPort.Python` for discovery)
    * `:worker_args` — extra command-line arguments for `lmport.bridge.worker` (default `[]`)
    * `:env` — extra environment, `[{"NAME", "value"}]`
    * `:cd` — working directory of the worker
    * `:grace_ms` — grace for client deadlines and for shutdown steps (default 5000)
    * `:hello_timeout` — how long to wait for `hello` (default 120000)
    * `:owner` — a pid; the worker stops when it dies (what `LMPort.run/2` uses)

  The generated `LMPort` module is the API most code uses; `call/4` and `stream/4` are its transport.
  """
  use GenServer
  require Logger

  alias LMPort.{Error, Msgpack, ProcessGroup}

  @protocol_major 1
  @default_grace_ms 5_000
  # The longest delay Process.send_after/3 is documented to take (about 49.7 days; above an architecture-specific
  # limit it raises badarg): the client-side deadline is capped at it.
  @max_timer_ms 0xFFFF_FFFF

  defstruct [
    :port,
    :os_pid,
    :pgid,
    :hello,
    :profiles,
    :grace_ms,
    :owner_ref,
    next_id: 1,
    pending: %{},
    monitors: %{}
  ]

  @type server :: GenServer.server()
  @type call_opts :: [
          timeout: pos_integer,
          timeout_profile: atom | String.t(),
          default_profile: String.t(),
          summary: boolean
        ]

  ## Public API

  @doc "A child spec; the shutdown budget covers the shutdown grace steps."
  def child_spec(opts) do
    grace = Keyword.get(opts, :grace_ms, @default_grace_ms)

    %{
      id: Keyword.get(opts, :id, Keyword.get(opts, :name, __MODULE__)),
      start: {__MODULE__, :start_link, [opts]},
      shutdown: 3 * grace + 2_000,
      restart: :permanent,
      type: :worker
    }
  end

  @doc "Starts the worker process and waits for its `hello`. Returns `{:error, %LMPort.Error{}}` if it cannot."
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts \\ []) do
    case Keyword.fetch(opts, :name) do
      {:ok, name} -> GenServer.start_link(__MODULE__, opts, name: name)
      :error -> GenServer.start_link(__MODULE__, opts)
    end
  end

  @doc "Stops the worker: `shutdown`, grace, then TERM/KILL of its process group."
  @spec stop(server, timeout) :: :ok
  def stop(server, timeout \\ :infinity), do: GenServer.stop(server, :normal, timeout)

  @doc "The worker's `hello` plus `os_pid`: `%{\"pgid\" => ..., \"os_pid\" => ..., ...}`."
  @spec info(server) :: map
  def info(server), do: GenServer.call(server, :info)

  @doc """
  Sends one request and waits for its response: `{:ok, result}` or `{:error, %LMPort.Error{}}`.

  `opts`: `:timeout` (ms) or `:timeout_profile` (sent to the worker, which enforces it), else the application
  defaults (`config :lmport, timeout: ms` / `timeout_profile: name`), else `:default_profile` (default: the
  method's own profile in `LMPort.Schema`, as the worker applies it).
  """
  @spec call(server, String.t(), map, call_opts) :: {:ok, term} | {:error, Error.t()}
  def call(server, method, params, opts \\ []) do
    safe_call(server, {:call, method, params, request_opts(method, opts, false)})
  end

  @doc """
  Starts a streaming request and returns a lazy `Stream` of its chunks' `data`.

  The request is sent when the stream is first consumed, by the consuming process. Halting early (`Enum.take/2`,
  a `break` in `Enum.reduce_while/3`, an exception) cancels it in the worker. An error response raises
  `LMPort.Error` from the consumer, as does a chunk out of order (`"protocol_error"`, the request is cancelled).
  With `summary: true` in `opts` the last element is `{:summary, result}`: the final response, which for
  generate/chat holds usage, finish reasons and metrics.
  """
  @spec stream(server, String.t(), map, call_opts) :: Enumerable.t()
  def stream(server, method, params, opts \\ []) do
    {summary?, opts} = Keyword.pop(opts, :summary, false)
    ropts = request_opts(method, opts, true)

    Stream.resource(
      fn ->
        case safe_call(server, {:call, method, params, ropts}) do
          {:ok, {wpid, id}} -> {wpid, id, Process.monitor(wpid), summary?, 0}
          {:error, error} -> raise error
        end
      end,
      &next_chunk/1,
      fn {wpid, id, mref, _, seq} ->
        Process.demonitor(mref, [:flush])
        if seq != :done, do: cancel_stream(wpid, id)
        flush(wpid, id)
      end
    )
  end

  # The accumulator's last element is the `seq` of the next chunk while the request runs, :done after it.
  defp next_chunk({_, _, _, _, :done} = acc), do: {:halt, acc}

  defp next_chunk({wpid, id, mref, summary?, seq}) do
    receive do
      {:lmport, ^wpid, ^id, {:chunk, ^seq, data}} ->
        {[data], {wpid, id, mref, summary?, seq + 1}}

      {:lmport, ^wpid, ^id, {:chunk, other, _data}} ->
        raise Error.new("protocol_error", "stream chunk seq #{inspect(other)}, expected #{seq}")

      {:lmport, ^wpid, ^id, {:done, {:ok, summary}}} ->
        done = {wpid, id, mref, summary?, :done}
        if summary?, do: {[{:summary, summary}], done}, else: {:halt, done}

      {:lmport, ^wpid, ^id, {:done, {:error, error}}} ->
        raise error

      {:DOWN, ^mref, :process, _, reason} ->
        raise Error.new("worker_exited", "worker exited: #{inspect(reason)}")
    end
  end

  # A call, not a cast: the worker GenServer forwards no chunk of `id` after it has handled the cancel, and its reply
  # arrives after every chunk it forwarded before (messages between two processes keep their order), so the flush
  # below finds them all.
  defp cancel_stream(wpid, id) do
    GenServer.call(wpid, {:cancel, id, self()}, :infinity)
  catch
    :exit, _ -> :ok
  end

  defp flush(wpid, id) do
    receive do
      {:lmport, ^wpid, ^id, _} -> flush(wpid, id)
    after
      0 -> :ok
    end
  end

  defp safe_call(server, msg) do
    GenServer.call(server, msg, :infinity)
  catch
    :exit, {reason, _} when reason in [:noproc, :normal, :shutdown] or elem(reason, 0) == :shutdown ->
      {:error, Error.new("spawn_failed", "lmport worker #{inspect(server)} is not running")}

    :exit, {reason, _} ->
      {:error, Error.new("worker_exited", "lmport worker exited: #{inspect(reason)}")}
  end

  # Per call, else the application's defaults (`config :lmport, timeout: ms` / `timeout_profile: name`).
  defp request_opts(method, opts, stream?) do
    {timeout, profile} =
      case {opts[:timeout], opts[:timeout_profile]} do
        {nil, nil} -> {Application.get_env(:lmport, :timeout), Application.get_env(:lmport, :timeout_profile)}
        given -> given
      end

    if timeout != nil and not (is_integer(timeout) and timeout > 0),
      do: raise(ArgumentError, "timeout must be a positive integer of milliseconds, got: #{inspect(timeout)}")

    default =
      if stream?,
        do: "streaming",
        else: Keyword.get_lazy(opts, :default_profile, fn -> profile_of(method) end)

    %{timeout: timeout, profile: profile && to_string(profile), default: default, stream: stream?}
  end

  # The method's own timeout profile, from the manifest: what the worker applies when a request names none.
  defp profile_of(method) do
    case LMPort.Schema.methods() do
      %{^method => %{"timeout_profile" => profile}} -> profile
      _ -> "default"
    end
  end

  ## GenServer

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)

    with {:ok, python} <- LMPort.Python.find(opts),
         {:ok, port} <- open_port(python, opts),
         {:ok, hello} <- await_hello(port, Keyword.get(opts, :hello_timeout, 120_000)) do
      {:ok,
       %__MODULE__{
         port: port,
         os_pid: Port.info(port, :os_pid) |> elem(1),
         pgid: hello["pgid"],
         hello: hello,
         # the worker's own profiles (hello always carries them) over the manifest's, merged once
         profiles: Map.merge(LMPort.Schema.timeout_profiles(), hello["timeout_profiles"] || %{}),
         grace_ms: Keyword.get(opts, :grace_ms, @default_grace_ms),
         owner_ref: opts[:owner] && Process.monitor(opts[:owner])
       }}
    else
      {:error, error} -> {:stop, error}
    end
  end

  defp open_port(python, opts) do
    root = LMPort.Python.checkout_root()
    env = Keyword.get(opts, :env, [])
    env = if root, do: [{"PYTHONPATH", pythonpath(root)} | env], else: env

    port_opts =
      [
        :binary,
        {:packet, 4},
        :exit_status,
        :use_stdio,
        :hide,
        args: ["-m", "lmport.bridge.worker" | Keyword.get(opts, :worker_args, [])],
        env: Enum.map(env, fn {k, v} -> {to_charlist(k), to_charlist(v)} end)
      ] ++
        if(opts[:cd], do: [cd: opts[:cd]], else: [])

    {:ok, Port.open({:spawn_executable, python}, port_opts)}
  rescue
    e -> {:error, Error.new("spawn_failed", "cannot start #{python}: #{Exception.message(e)}")}
  end

  defp pythonpath(root) do
    case System.get_env("PYTHONPATH") do
      nil -> root
      "" -> root
      existing -> root <> ":" <> existing
    end
  end

  defp await_hello(port, timeout) do
    receive do
      {^port, {:data, frame}} ->
        case Msgpack.decode(frame) do
          {:ok, %{"type" => "hello"} = hello} ->
            check_protocol(port, hello)

          {:ok, other} ->
            hello_failure(
              port,
              "spawn_failed",
              "expected hello as the first frame, got #{inspect(other, limit: 10)}"
            )

          {:error, e} ->
            hello_failure(
              port,
              "protocol_error",
              "unreadable first frame from the worker: #{Exception.message(e)}"
            )
        end

      {^port, {:exit_status, status}} ->
        {:error,
         Error.new(
           "spawn_failed",
           "lmport worker exited with status #{status} before hello (see its stderr)"
         )}
    after
      timeout -> hello_failure(port, "spawn_failed", "no hello from the lmport worker within #{timeout} ms")
    end
  end

  # A hello without a protocol version is another protocol too.
  defp check_protocol(port, hello) do
    case hello["protocol"] do
      @protocol_major ->
        {:ok, hello}

      other ->
        hello_failure(
          port,
          "protocol_mismatch",
          "worker speaks protocol #{inspect(other)}, this client speaks #{@protocol_major}"
        )
    end
  end

  defp hello_failure(port, code, message) do
    {:os_pid, os_pid} = Port.info(port, :os_pid) || {:os_pid, nil}
    Port.close(port)
    if os_pid, do: ProcessGroup.signal(nil, os_pid, "KILL")
    {:error, Error.new(code, message)}
  end

  @impl true
  def handle_call(:info, _from, state), do: {:reply, Map.put(state.hello, "os_pid", state.os_pid), state}

  def handle_call({:cancel, id, pid}, _from, state) do
    case state.pending do
      %{^id => %{pid: ^pid}} -> {:reply, :ok, cancel_request(state, id)}
      _ -> {:reply, :ok, state}
    end
  end

  def handle_call({:call, method, params, ropts}, {pid, _} = from, state) do
    id = state.next_id

    frame =
      %{"type" => "request", "id" => id, "method" => method, "params" => params}
      |> put_if("timeout_ms", ropts.timeout)
      |> put_if("timeout_profile", ropts.profile)
      |> put_if("stream", ropts.stream || nil)

    with {:ok, bin} <- encode_request(frame, state.hello["max_frame_bytes"]),
         :ok <- command(state.port, bin) do
      mref = Process.monitor(pid)
      client_ms = min(deadline_ms(state, ropts) + state.grace_ms, @max_timer_ms)
      timer = Process.send_after(self(), {:deadline, id}, client_ms)
      entry = %{from: if(ropts.stream, do: nil, else: from), pid: pid, mref: mref, timer: timer}

      state = %{
        state
        | next_id: id + 1,
          pending: Map.put(state.pending, id, entry),
          monitors: Map.put(state.monitors, mref, id)
      }

      if ropts.stream, do: {:reply, {:ok, {self(), id}}, state}, else: {:noreply, state}
    else
      {:error, error} -> {:reply, {:error, error}, state}
    end
  end

  # The port may have closed with its exit message still queued behind this call: answer, don't crash.
  defp command(port, bin) do
    Port.command(port, bin)
    :ok
  rescue
    # "sent" => false: the request never reached the worker (an LMPort.Pool sends it to another one)
    ArgumentError ->
      {:error, Error.new("worker_exited", "lmport worker's port is closed", %{"sent" => false})}
  end

  # The worker would discard an oversize frame without learning its id, so the caller would only see a timeout.
  # Whatever the caller passed, a value that cannot be encoded is its error, never a crash of this GenServer.
  defp encode_request(frame, max_bytes) do
    case safe_encode(frame) do
      {:ok, bin} when is_integer(max_bytes) and byte_size(bin) > max_bytes ->
        {:error,
         Error.new(
           "invalid_params",
           "request of #{byte_size(bin)} bytes exceeds the worker's max_frame_bytes (#{max_bytes})",
           %{"field" => "params"}
         )}

      {:ok, bin} ->
        {:ok, bin}

      {:error, e} ->
        {:error,
         Error.new("invalid_params", "params cannot be encoded: #{Exception.message(e)}", %{
           "field" => "params"
         })}
    end
  end

  defp safe_encode(frame) do
    Msgpack.encode(frame)
  rescue
    e -> {:error, e}
  end

  defp put_if(map, _key, nil), do: map
  defp put_if(map, key, value), do: Map.put(map, key, value)

  defp deadline_ms(_state, %{timeout: ms}) when is_integer(ms), do: ms

  defp deadline_ms(%{profiles: profiles}, ropts),
    do: Map.get(profiles, ropts.profile || ropts.default, profiles["default"])

  @impl true
  def handle_info({port, {:data, frame}}, %{port: port} = state) do
    case Msgpack.decode(frame) do
      {:ok, %{"type" => type} = msg} ->
        {:noreply, handle_frame(type, msg, state)}

      {:ok, _not_a_message} ->
        {:noreply, state}

      # The stream of frames can no longer be trusted: give up on this worker, as on a wedged one.
      {:error, e} ->
        message = "unreadable frame from the lmport worker: #{Exception.message(e)}"
        Logger.error("lmport: #{message}; killing its process group")
        state = fail_all(state, Error.new("protocol_error", message))
        ProcessGroup.signal(state.pgid, state.os_pid, "KILL")
        {:stop, {:shutdown, :protocol_error}, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    message = "lmport worker (os pid #{state.os_pid}) exited with status #{status}"
    state = fail_all(state, Error.new("worker_exited", message))
    ProcessGroup.kill_leftovers(state.pgid, state.os_pid)
    {:stop, {:shutdown, {:worker_exited, status}}, %{state | port: nil}}
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    state = fail_all(state, Error.new("worker_exited", "lmport worker port closed: #{inspect(reason)}"))
    # the port is gone, but the worker or what it started may live on: nothing of its group may remain
    ProcessGroup.kill_leftovers(state.pgid, state.os_pid)
    {:stop, {:shutdown, {:worker_exited, reason}}, %{state | port: nil}}
  end

  def handle_info({:DOWN, ref, :process, _pid, _reason}, %{owner_ref: ref} = state),
    do: {:stop, :normal, state}

  def handle_info({:DOWN, mref, :process, _pid, _reason}, state) do
    case Map.fetch(state.monitors, mref) do
      {:ok, id} -> {:noreply, cancel_request(state, id)}
      :error -> {:noreply, state}
    end
  end

  def handle_info({:deadline, id}, state) do
    case Map.fetch(state.pending, id) do
      {:ok, %{ping: true}} ->
        Logger.error("lmport: worker (pgid #{state.pgid}) does not answer ping; killing its process group")
        state = fail_all(state, Error.new("worker_exited", "lmport worker stopped answering and was killed"))
        {:stop, {:shutdown, :worker_unresponsive}, state}

      {:ok, entry} ->
        reply(
          entry,
          id,
          {:error,
           Error.new("deadline_exceeded", "no response to request #{id} within its deadline; cancelled", %{
             "client_side" => true
           })}
        )

        {:noreply, state |> cancel_request(id) |> send_liveness_ping()}

      :error ->
        {:noreply, state}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp handle_frame("response", %{"id" => id} = msg, state) do
    case Map.pop(state.pending, id) do
      {nil, _} ->
        state

      {entry, pending} ->
        result = if msg["ok"], do: {:ok, msg["result"]}, else: {:error, Error.from_wire(msg["error"] || %{})}
        forget(entry)
        if !Map.get(entry, :ping), do: reply(entry, id, result)
        %{state | pending: pending, monitors: Map.delete(state.monitors, entry.mref)}
    end
  end

  defp handle_frame("chunk", %{"id" => id} = msg, state) do
    case state.pending do
      %{^id => %{from: nil, pid: pid}} -> send(pid, {:lmport, self(), id, {:chunk, msg["seq"], msg["data"]}})
      _ -> :ok
    end

    state
  end

  defp handle_frame("event", %{"name" => "protocol_error"} = msg, state) do
    Logger.warning("lmport: worker reported a protocol error: #{inspect(msg["data"])}")
    state
  end

  # hello again, other events, unknown types: the protocol grows by adding, so ignore.
  defp handle_frame(_type, _msg, state), do: state

  defp reply(%{from: nil, pid: pid}, id, result), do: send(pid, {:lmport, self(), id, {:done, result}})
  defp reply(%{from: from}, _id, result), do: GenServer.reply(from, result)

  defp forget(entry) do
    if entry.mref, do: Process.demonitor(entry.mref, [:flush])
    Process.cancel_timer(entry.timer)
  end

  defp cancel_request(state, id) do
    {entry, pending} = Map.pop(state.pending, id)
    forget(entry)
    send_frame(state, %{"type" => "cancel", "id" => id})
    %{state | pending: pending, monitors: Map.delete(state.monitors, entry.mref)}
  end

  # After a client-side deadline: is the worker wedged? Ping it; no answer within the grace -> kill and restart.
  defp send_liveness_ping(state) do
    id = state.next_id
    send_frame(state, %{"type" => "request", "id" => id, "method" => "ping", "params" => %{}})
    timer = Process.send_after(self(), {:deadline, id}, state.grace_ms)
    entry = %{from: nil, pid: nil, mref: nil, timer: timer, ping: true}
    %{state | next_id: id + 1, pending: Map.put(state.pending, id, entry)}
  end

  defp send_frame(%{port: nil}, _frame), do: :ok

  defp send_frame(%{port: port}, frame) do
    Port.command(port, Msgpack.encode!(frame))
  rescue
    ArgumentError -> :ok
  end

  defp fail_all(state, error) do
    for {id, entry} <- state.pending, !Map.get(entry, :ping) do
      forget(entry)
      reply(entry, id, {:error, error})
    end

    %{state | pending: %{}, monitors: %{}}
  end

  @impl true
  def terminate(_reason, state) do
    state = fail_all(state, Error.new("shutting_down", "lmport worker is shutting down"))
    if state.port, do: stop_worker(state)
    :ok
  end

  # shutdown request -> grace -> TERM the group -> grace -> KILL the group; then nothing of the group may remain.
  defp stop_worker(state) do
    send_frame(state, %{"type" => "request", "id" => state.next_id, "method" => "shutdown", "params" => %{}})

    unless await_exit(state.port, state.grace_ms) do
      ProcessGroup.signal(state.pgid, state.os_pid, "TERM")

      unless await_exit(state.port, state.grace_ms) do
        ProcessGroup.signal(state.pgid, state.os_pid, "KILL")
        await_exit(state.port, 1_000)
      end
    end

    ProcessGroup.kill_leftovers(state.pgid, state.os_pid)
  end

  defp await_exit(port, timeout) do
    receive do
      {^port, {:exit_status, _}} -> true
      {^port, {:data, _}} -> await_exit(port, timeout)
    after
      timeout -> false
    end
  end
end
