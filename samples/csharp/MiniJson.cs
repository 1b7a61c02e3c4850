// A small JSON reader: objects become Dictionary<string, object>, arrays List<object>, numbers
// double. Mono's and .NET's class libraries share no JSON reader, and NuGet is not needed for this.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Spexport.Samples
{
    public sealed class MiniJson
    {
        readonly string text;
        int at;

        MiniJson(string text)
        {
            this.text = text;
        }

        public static object Parse(string text)
        {
            var reader = new MiniJson(text);
            object value = reader.Value();
            reader.SkipSpace();
            if (reader.at != text.Length) throw reader.Error("trailing characters");
            return value;
        }

        FormatException Error(string what)
        {
            return new FormatException("bad JSON at character " + at + ": " + what);
        }

        void SkipSpace()
        {
            while (at < text.Length && char.IsWhiteSpace(text[at])) at++;
        }

        bool Take(char c)
        {
            SkipSpace();
            if (at < text.Length && text[at] == c)
            {
                at++;
                return true;
            }
            return false;
        }

        void Expect(char c)
        {
            if (!Take(c)) throw Error("expected '" + c + "'");
        }

        object Value()
        {
            SkipSpace();
            if (at >= text.Length) throw Error("unexpected end");
            char c = text[at];
            if (c == '{') return Object();
            if (c == '[') return Array();
            if (c == '"') return String();
            foreach (var literal in new[] { "true", "false", "null" })
            {
                if (string.CompareOrdinal(text, at, literal, 0, literal.Length) == 0)
                {
                    at += literal.Length;
                    return literal == "null" ? null : (object)(literal == "true");
                }
            }
            int start = at;
            while (at < text.Length && "+-0123456789.eE".IndexOf(text[at]) >= 0) at++;
            double number;
            if (!double.TryParse(text.Substring(start, at - start), NumberStyles.Float, CultureInfo.InvariantCulture, out number))
                throw Error("expected a value");
            return number;
        }

        Dictionary<string, object> Object()
        {
            var result = new Dictionary<string, object>();
            Expect('{');
            if (Take('}')) return result;
            do
            {
                SkipSpace();
                string key = String();
                Expect(':');
                result[key] = Value();
            } while (Take(','));
            Expect('}');
            return result;
        }

        List<object> Array()
        {
            var result = new List<object>();
            Expect('[');
            if (Take(']')) return result;
            do result.Add(Value()); while (Take(','));
            Expect(']');
            return result;
        }

        string String()
        {
            if (at >= text.Length || text[at] != '"') throw Error("expected a string");
            var result = new StringBuilder();
            for (at++; at < text.Length && text[at] != '"'; at++)
            {
                char c = text[at];
                if (c != '\\')
                {
                    result.Append(c);
                    continue;
                }
                char escaped = text[++at];
                if (escaped == 'u')
                {
                    result.Append((char)Convert.ToInt32(text.Substring(at + 1, 4), 16));
                    at += 4;
                }
                else
                {
                    int which = "\"\\/bfnrt".IndexOf(escaped);
                    if (which < 0) throw Error("bad escape");
                    result.Append("\"\\/\b\f\n\r\t"[which]);
                }
            }
            if (at >= text.Length) throw Error("unterminated string");
            at++;
            return result.ToString();
        }
    }
}
