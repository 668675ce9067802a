defmodule LMPort.Client do
  @moduledoc """
  The glue between the generated `LMPort` functions and `LMPort.Worker`: splits call options from method
  parameters, validates the parameters locally against the manifest (`LMPort.Schema`, generated) and sends
  the request. Nothing is sent when validation fails: the result is `{:error, %LMPort.Error{code:
  "invalid_params", details: %{"field" => name}}}`, as the worker itself would answer.
  """
  alias LMPort.{Error, Pool, Schema, Validate, Worker}

  @call_opts [:timeout, :timeout_profile]

  @doc "Validates and sends `method`. `positional` holds the required parameters, `opts` the rest."
  @spec call(LMPort.worker(), String.t(), map, keyword) :: {:ok, term} | {:error, Error.t()}
  def call(worker, method, positional, opts) do
    spec = Schema.method(method)
    {stream?, opts} = Keyword.pop(opts, :stream, false)
    {call_opts, param_opts} = Keyword.split(opts, @call_opts)

    with :ok <- check_stream(method, spec, stream?),
         :ok <- check_call_opts(call_opts),
         {:ok, params} <- Validate.params(method, spec["params"], Map.merge(positional, Map.new(param_opts))) do
      send_call(worker, method, params, stream?, call_opts)
    end
  end

  defp send_call({:pool, pool}, method, params, false, call_opts),
    do: Pool.call(pool, method, params, call_opts)

  defp send_call({:pool, pool}, method, params, stream?, call_opts),
    do: {:ok, Pool.stream(pool, method, params, [summary: stream? == :with_summary] ++ call_opts)}

  defp send_call(worker, method, params, false, call_opts), do: Worker.call(worker, method, params, call_opts)

  defp send_call(worker, method, params, stream?, call_opts),
    do: {:ok, Worker.stream(worker, method, params, [summary: stream? == :with_summary] ++ call_opts)}

  @doc "Returns the result of an `{:ok, result}` tuple or raises the `LMPort.Error`."
  @spec unwrap!({:ok, term} | {:error, Error.t()}) :: term
  def unwrap!({:ok, result}), do: result
  def unwrap!({:error, %Error{} = error}), do: raise(error)

  defp check_stream(_method, _spec, false), do: :ok
  defp check_stream(_method, %{"streaming" => true}, mode) when mode in [true, :with_summary], do: :ok

  defp check_stream(method, %{"streaming" => true}, other),
    do: invalid("stream", "#{method}: stream must be false, true or :with_summary, got: #{inspect(other)}")

  defp check_stream(method, _spec, other),
    do: invalid("stream", "#{method} does not stream; stream must be false, got: #{inspect(other)}")

  defp check_call_opts(call_opts) do
    profiles = Map.keys(Schema.timeout_profiles())

    Enum.find_value(call_opts, :ok, fn
      {:timeout, ms} when is_integer(ms) and ms > 0 ->
        nil

      {:timeout, ms} ->
        invalid("timeout", "timeout must be a positive integer of milliseconds, got: #{inspect(ms)}")

      {:timeout_profile, p} when is_atom(p) or is_binary(p) ->
        if to_string(p) in profiles, do: nil, else: bad_profile(p, profiles)

      {:timeout_profile, p} ->
        bad_profile(p, profiles)
    end)
  end

  defp bad_profile(p, profiles),
    do:
      invalid(
        "timeout_profile",
        "timeout_profile must be one of #{Enum.join(profiles, ", ")}, got: #{inspect(p)}"
      )

  defp invalid(field, message), do: {:error, Error.new("invalid_params", message, %{"field" => field})}
end
