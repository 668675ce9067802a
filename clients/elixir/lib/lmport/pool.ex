defmodule LMPort.Pool do
  @moduledoc """
  A pool of `LMPort.Worker`s under one supervisor, called through the same `LMPort` functions with
  `{:pool, pool}` in place of a worker:

      {:ok, _} = LMPort.Pool.start_link(name: MyApp.LLMPool, size: 2)
      llm = LMPort.llm!({:pool, MyApp.LLMPool}, "smollm2")
      [out] = LMPort.generate!({:pool, MyApp.LLMPool}, llm, "Hello", sampling_params: [max_tokens: 8])

  The supervisor (`:rest_for_one`) runs a router (`LMPort.Pool.Router`, registered under `:name`) and a
  `:one_for_one` supervisor of `:size` workers; a worker that dies is restarted by it while the others serve.

    * **Routing.** A call checks a worker out of the router — the live worker with the fewest calls in flight
      (ties rotate) — and then talks to that worker directly, so the router never carries generation traffic.
      The router monitors the caller: a caller that dies gives its worker back.
    * **Handles are pool-wide.** `LMPort.llm({:pool, pool}, ...)` returns a handle whose `"ref"` is the pool's
      (`"pool-llm-1"`). The router remembers the model and options, loads them on every live worker at once and
      on a restarted worker at its first checkout (callers share that load), and maps the handle to each
      worker's own ref. A ref the pool did not make fails with `"not_found"` naming the field.
      `LMPort.release({:pool, pool}, llm)` frees it on every worker.
    * **Retries only for calls never admitted**: a call whose worker was not running or whose port was closed
      (the request was never written), or that was answered `"overloaded"`, or `"shutting_down"` without
      `details["usage"]` (stopped before any engine work), or whose worker died while loading the handle's
      model, goes to another worker (each at most once). A call written to a worker that then dies fails with
      `"worker_exited"`; nothing that may have started is replayed. A stream is never retried.
    * **Across nodes.** With `group: name`, the router joins the `:pg` group `{:lmport_pool, name}` (scope
      `LMPort.PG`, started by the `:lmport` application); `members/1` and `pick/1` find pools of that group on
      every connected node, and `{:pool, pid}` works with a remote router's pid like with a local one (see
      docs/scaling.md).

  ## Options (`start_link/1`)

    * `:name` (required) — registers the router; use it as `{:pool, name}`
    * `:size` — number of workers (default 2)
    * `:group` — a `:pg` group to join (any term)
    * `:max_restarts`, `:max_seconds` — restart intensity of the workers' supervisor (default 3 in 5 s, OTP's)
    * every other option is an `LMPort.Worker.start_link/1` option for each worker (`:python`, `:env`, ...)
  """
  use Supervisor

  alias LMPort.{Error, Schema, Worker}
  alias LMPort.Pool.Router

  @scope LMPort.PG

  @typedoc "An `LMPort.Pool`: the router's registered name or pid (local or on another node)."
  @type server :: GenServer.server()

  @doc "Starts the pool; returns once every worker has sent its `hello`."
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts), do: Supervisor.start_link(__MODULE__, opts)

  @doc false
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :id, Keyword.fetch!(opts, :name)),
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @impl true
  def init(opts) do
    {name, opts} = Keyword.pop!(opts, :name)
    {size, opts} = Keyword.pop(opts, :size, 2)
    {group, opts} = Keyword.pop(opts, :group)
    {intensity, worker_opts} = Keyword.split(opts, [:max_restarts, :max_seconds])
    worker_opts = Keyword.drop(worker_opts, [:id])

    unless is_integer(size) and size >= 1,
      do: raise(ArgumentError, "size must be an integer >= 1, got: #{inspect(size)}")

    workers =
      for index <- 0..(size - 1) do
        Supervisor.child_spec({Worker, worker_opts},
          id: {:worker, index},
          start: {__MODULE__, :start_worker, [name, index, worker_opts]}
        )
      end

    children = [
      {Router, name: name, size: size, group: group && {:lmport_pool, group}},
      %{
        id: :workers,
        type: :supervisor,
        start: {Supervisor, :start_link, [workers, [strategy: :one_for_one] ++ intensity]}
      }
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end

  @doc false
  # How the workers' supervisor (re)starts worker `index`: the router learns each new pid.
  def start_worker(router, index, opts) do
    with {:ok, pid} <- Worker.start_link(opts) do
      Router.worker_up(router, index, pid)
      {:ok, pid}
    end
  end

  @doc "Stops the pool and every worker."
  @spec stop(Supervisor.supervisor()) :: :ok
  def stop(supervisor), do: Supervisor.stop(supervisor)

  @doc "The workers' pids by place, `nil` where one is restarting."
  @spec workers(server) :: [pid | nil]
  def workers(pool), do: GenServer.call(pool, :workers)

  @doc "How many workers were restarted after they died."
  @spec restarts(server) :: non_neg_integer
  def restarts(pool), do: GenServer.call(pool, :restarts)

  @doc "Routers of every pool in `:pg` group `group`, on every connected node."
  @spec members(term) :: [pid]
  def members(group), do: :pg.get_members(@scope, {:lmport_pool, group})

  @doc "A pool of `group` to call: one on this node if there is one, else one on another node; nil for none."
  @spec pick(term) :: pid | nil
  def pick(group) do
    case {:pg.get_local_members(@scope, {:lmport_pool, group}), members(group)} do
      {[], []} -> nil
      {[], remote} -> Enum.random(remote)
      {local, _} -> Enum.random(local)
    end
  end

  @doc """
  Sends `method` to one of the pool's workers (what `LMPort` functions do for `{:pool, pool}`); parameters are
  already validated. Pool handles among the parameters are mapped to the chosen worker's refs.
  """
  @spec call(server, String.t(), map, keyword) :: {:ok, term} | {:error, Error.t()}
  def call(pool, "llm", params, opts), do: GenServer.call(pool, {:llm, params, opts}, :infinity)
  def call(pool, "release", %{"ref" => ref}, opts), do: GenServer.call(pool, {:release, ref, opts}, :infinity)

  def call(pool, method, params, opts) do
    attempt(pool, params, handles(method, params), [], nil, &Worker.call(&1, method, &2, opts))
  end

  @doc "Streaming twin of `call/4` (see `LMPort.Worker.stream/4`); the worker is given back when the stream ends."
  @spec stream(server, String.t(), map, keyword) :: Enumerable.t()
  def stream(pool, method, params, opts) do
    Stream.resource(
      fn -> checkout!(pool, params, handles(method, params)) end,
      fn
        {:out, pid, local, token} -> {[{pid, local}], {:done, token}}
        {:done, _token} = acc -> {:halt, acc}
      end,
      fn {_, token} -> Router.checkin(pool, token) end
    )
    |> Stream.flat_map(fn {pid, local} -> Worker.stream(pid, method, local, opts) end)
  end

  # Checks a worker out, runs `send` on it, and tries the next worker while the failure proves the call was
  # never admitted.
  defp attempt(pool, params, handles, tried, last, send) do
    case Router.checkout(pool, handles, tried) do
      {:ok, pid, refs, token} ->
        result =
          try do
            send.(pid, localize(params, refs))
          after
            Router.checkin(pool, token)
          end

        if not_admitted?(result),
          do: attempt(pool, params, handles, [pid | tried], result, send),
          else: result

      {:retry, pid, error} ->
        attempt(pool, params, handles, [pid | tried], {:error, error}, send)

      :exhausted ->
        last || {:error, shutting_down()}

      {:error, _} = error ->
        error
    end
  end

  defp checkout!(pool, params, handles) do
    case Router.checkout(pool, handles, []) do
      {:ok, pid, refs, token} -> {:out, pid, localize(params, refs), token}
      {:retry, _pid, error} -> raise error
      :exhausted -> raise shutting_down()
      {:error, error} -> raise error
    end
  end

  defp shutting_down, do: Error.new("shutting_down", "no worker of the pool is running")

  # {field, pool ref} of every handle parameter of `method` that is set.
  defp handles(method, params) do
    for %{"name" => name, "type" => type} <- Schema.method(method)["params"],
        "handle" in String.split(type, "|"),
        value = params[name],
        value != nil,
        do: {name, ref_of(value)}
  end

  defp ref_of(%{"ref" => ref}), do: ref
  defp ref_of(ref), do: ref

  defp localize(params, refs), do: Map.merge(params, refs)

  defp not_admitted?({:error, %Error{code: "spawn_failed"}}), do: true
  defp not_admitted?({:error, %Error{code: "overloaded"}}), do: true
  defp not_admitted?({:error, %Error{details: %{"sent" => false}}}), do: true

  defp not_admitted?({:error, %Error{code: "shutting_down", details: details}}),
    do: not is_map_key(details, "usage")

  defp not_admitted?(_), do: false
end
