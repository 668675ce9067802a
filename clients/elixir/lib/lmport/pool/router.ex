defmodule LMPort.Pool.Router do
  @moduledoc """
  The bookkeeping of an `LMPort.Pool`: which worker lives in each place, its calls in flight, the pool handles
  and each worker's ref for them. Callers check a worker out (`checkout/3`), call it directly and check it back
  in (`checkin/2`); the router never waits on a worker itself: model loads and releases run in tasks.
  """
  use GenServer

  alias LMPort.{Error, Worker}

  defstruct [
    :size,
    workers: %{},
    handles: %{},
    checkouts: %{},
    loads: %{},
    loading: %{},
    waiting: [],
    llm_calls: %{},
    next_handle: 1,
    next_index: 0,
    restarts: 0
  ]

  # workers:   index => %{pid, mref, inflight, refs: %{pool ref => worker ref}}
  # handles:   pool ref => the llm parameters behind it
  # checkouts: caller monitor ref (the checkout's token) => {index, pid}
  # loads:     task ref => {index, pid, pool ref};  loading: {index, pool ref} => waiters of that load
  # waiting:   checkouts that found no live untried worker while some place was restarting

  @doc false
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: Keyword.fetch!(opts, :name))

  @doc "A worker for a call that needs `handles` (`[{field, pool ref}]`), not one of `tried`."
  @spec checkout(GenServer.server(), [{String.t(), term}], [pid]) ::
          {:ok, pid, map, reference} | {:retry, pid, Error.t()} | :exhausted | {:error, Error.t()}
  def checkout(pool, handles, tried), do: GenServer.call(pool, {:checkout, handles, tried}, :infinity)

  @doc "Gives a checked-out worker back."
  @spec checkin(GenServer.server(), reference) :: :ok
  def checkin(pool, token), do: GenServer.cast(pool, {:checkin, token})

  @doc false
  def worker_up(pool, index, pid), do: GenServer.cast(pool, {:worker_up, index, pid})

  @impl true
  def init(opts) do
    if group = opts[:group], do: :ok = :pg.join(LMPort.PG, group, self())
    {:ok, %__MODULE__{size: Keyword.fetch!(opts, :size)}}
  end

  @impl true
  def handle_call(:workers, _from, state),
    do: {:reply, for(i <- 0..(state.size - 1), do: get_in(state.workers, [i, :pid])), state}

  def handle_call(:restarts, _from, state), do: {:reply, state.restarts, state}

  def handle_call({:checkout, handles, tried}, {caller, _} = from, state) do
    case Enum.find(handles, fn {_field, ref} -> not is_map_key(state.handles, ref) end) do
      {field, ref} ->
        {:reply, {:error, not_found(field, ref)}, state}

      nil ->
        {:noreply, checkout(state, from, caller, handles, tried)}
    end
  end

  def handle_call({:llm, params, _opts}, from, state) do
    live = for {index, %{pid: pid}} <- state.workers, pid != nil, do: index

    if live == [] do
      {:reply, {:error, Error.new("shutting_down", "no worker of the pool is running")}, state}
    else
      ref = "pool-llm-#{state.next_handle}"
      call = %{from: from, ref: ref, pending: length(live), replied: false, errors: []}

      state = %{
        state
        | next_handle: state.next_handle + 1,
          handles: Map.put(state.handles, ref, params),
          llm_calls: Map.put(state.llm_calls, ref, call)
      }

      {:noreply, Enum.reduce(live, state, &await_load(&2, &1, ref, {:llm, ref}))}
    end
  end

  def handle_call({:release, handle, opts}, from, state) do
    ref = ref_of(handle)

    if is_map_key(state.handles, ref) do
      loaded = for {_, %{pid: pid, refs: %{^ref => wref}}} <- state.workers, pid != nil, do: {pid, wref}
      workers = Map.new(state.workers, fn {i, w} -> {i, %{w | refs: Map.delete(w.refs, ref)}} end)
      # a task answers: the router never waits on a worker
      spawn(fn -> GenServer.reply(from, {:ok, release_all(ref, loaded, opts)}) end)
      {:noreply, %{state | handles: Map.delete(state.handles, ref), workers: workers}}
    else
      {:reply, {:error, not_found("ref", ref)}, state}
    end
  end

  @impl true
  def handle_cast({:checkin, token}, state) do
    Process.demonitor(token, [:flush])
    {:noreply, uncount(state, token)}
  end

  def handle_cast({:worker_up, index, pid}, state) do
    restarted? = is_map_key(state.workers, index)
    worker = %{pid: pid, mref: Process.monitor(pid), inflight: 0, refs: %{}}

    waiting = state.waiting

    state = %{
      state
      | workers: Map.put(state.workers, index, worker),
        restarts: state.restarts + if(restarted?, do: 1, else: 0),
        waiting: []
    }

    # the checkouts that waited for a worker try again
    {:noreply,
     Enum.reduce(Enum.reverse(waiting), state, fn {from, caller, handles, tried}, acc ->
       checkout(acc, from, caller, handles, tried)
     end)}
  end

  @impl true
  def handle_info({task, result}, state) when is_map_key(state.loads, task) do
    Process.demonitor(task, [:flush])
    {{index, pid, ref}, loads} = Map.pop(state.loads, task)
    {waiters, loading} = Map.pop(state.loading, {index, ref}, [])
    state = %{state | loads: loads, loading: loading}
    same_worker? = get_in(state.workers, [index, :pid]) == pid

    state =
      case result do
        {:ok, %{"ref" => wref}} when same_worker? ->
          put_in(state.workers[index].refs[ref], wref)

        _ ->
          state
      end

    outcome =
      if same_worker?, do: result, else: {:error, Error.new("worker_exited", "worker exited while loading")}

    {:noreply, Enum.reduce(Enum.reverse(waiters), state, &loaded(&2, &1, index, pid, outcome))}
  end

  def handle_info({:DOWN, mref, :process, _pid, _reason}, state) do
    case Enum.find(state.workers, fn {_, w} -> w.mref == mref end) do
      {index, _} ->
        {:noreply, put_in(state.workers[index], %{pid: nil, mref: nil, inflight: 0, refs: %{}})}

      nil ->
        {:noreply, uncount(state, mref)}
    end
  end

  ## Checking out

  defp checkout(state, from, caller, handles, tried) do
    case pick(state, tried) do
      {:ok, index} ->
        token = Process.monitor(caller)
        state = update_in(state.workers[index].inflight, &(&1 + 1))

        state = %{
          state
          | checkouts: Map.put(state.checkouts, token, {index, state.workers[index].pid}),
            next_index: rem(index + 1, state.size)
        }

        continue_checkout(state, index, from, token, handles)

      :wait ->
        %{state | waiting: [{from, caller, handles, tried} | state.waiting]}

      :exhausted ->
        GenServer.reply(from, :exhausted)
        state
    end
  end

  # Replies once the worker has a ref for every handle; loads the first missing one otherwise.
  defp continue_checkout(state, index, from, token, handles) do
    %{pid: pid, refs: refs} = state.workers[index]

    case Enum.find(handles, fn {_field, ref} -> not is_map_key(refs, ref) end) do
      nil ->
        GenServer.reply(from, {:ok, pid, Map.new(handles, fn {field, ref} -> {field, refs[ref]} end), token})
        state

      {_field, ref} ->
        await_load(state, index, ref, {:checkout, from, token, handles})
    end
  end

  # The least-loaded live worker not tried yet, starting the search after the last one picked (ties rotate).
  defp pick(state, tried) do
    candidates =
      for k <- 0..(state.size - 1),
          index = rem(state.next_index + k, state.size),
          %{pid: pid} = w when pid != nil <- [Map.get(state.workers, index, %{pid: nil})],
          pid not in tried,
          do: {w.inflight, k, index}

    restarting? = Enum.any?(0..(state.size - 1), &(get_in(state.workers, [&1, :pid]) == nil))

    case Enum.min(candidates, fn -> nil end) do
      {_, _, index} -> {:ok, index}
      nil when restarting? -> :wait
      nil -> :exhausted
    end
  end

  defp uncount(state, token) do
    case Map.pop(state.checkouts, token) do
      {nil, _} ->
        state

      {{index, pid}, checkouts} ->
        state = %{state | checkouts: checkouts}

        if get_in(state.workers, [index, :pid]) == pid,
          do: update_in(state.workers[index].inflight, &(&1 - 1)),
          else: state
    end
  end

  ## Loading handles

  # Adds `waiter` to the load of pool handle `ref` on worker `index`, starting that load if none runs.
  defp await_load(state, index, ref, waiter) do
    key = {index, ref}

    if is_map_key(state.loading, key) do
      update_in(state.loading[key], &[waiter | &1])
    else
      pid = state.workers[index].pid
      params = state.handles[ref]
      task = Task.async(fn -> Worker.call(pid, "llm", params) end)

      %{
        state
        | loads: Map.put(state.loads, task.ref, {index, pid, ref}),
          loading: Map.put(state.loading, key, [waiter])
      }
    end
  end

  defp loaded(state, {:checkout, from, token, handles}, index, pid, outcome) do
    cond do
      not is_map_key(state.checkouts, token) ->
        state

      match?({:ok, _}, outcome) ->
        continue_checkout(state, index, from, token, handles)

      true ->
        {:error, error} = outcome
        Process.demonitor(token, [:flush])
        GenServer.reply(from, {:retry, pid, error})
        uncount(state, token)
    end
  end

  defp loaded(state, {:llm, ref}, _index, _pid, outcome) do
    call = state.llm_calls[ref]

    call =
      case outcome do
        {:ok, handle} when not call.replied ->
          GenServer.reply(call.from, {:ok, Map.put(handle, "ref", ref)})
          %{call | replied: true}

        {:ok, _} ->
          call

        {:error, error} ->
          %{call | errors: [error | call.errors]}
      end

    call = %{call | pending: call.pending - 1}

    cond do
      call.pending > 0 ->
        put_in(state.llm_calls[ref], call)

      call.replied ->
        %{state | llm_calls: Map.delete(state.llm_calls, ref)}

      true ->
        # a worker that died mid-load says nothing about the parameters: prefer another worker's answer
        error = Enum.find(call.errors, hd(call.errors), &(&1.code != "worker_exited"))
        GenServer.reply(call.from, {:error, error})
        %{state | llm_calls: Map.delete(state.llm_calls, ref), handles: Map.delete(state.handles, ref)}
    end
  end

  defp release_all(ref, loaded, opts) do
    unloaded =
      Enum.any?(loaded, fn {pid, wref} ->
        match?({:ok, %{"unloaded" => true}}, Worker.call(pid, "release", %{"ref" => wref}, opts))
      end)

    %{"ref" => ref, "unloaded" => unloaded}
  end

  defp not_found(field, ref),
    do: Error.new("not_found", "#{field}: #{inspect(ref)} is not a handle of this pool", %{"field" => field})

  defp ref_of(%{"ref" => ref}), do: ref
  defp ref_of(ref), do: ref
end
